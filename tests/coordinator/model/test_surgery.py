"""Sub-LLM surgery: generic layer discovery, layer dropping, index fixing, KV cache, baselines."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from coordinator.model.surgery import (
    build_submodel,
    capture_layer_io,
    find_decoder_layers,
    layer_map_of,
    skip_layers,
)
from shared.errors import ModelError
from tests.coordinator.arch_models import ARCHS, VOCAB, tiny_model

EXPECTED_PREFIX = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "mistral": "model.layers",
    "gemma2": "model.layers",
    "phi": "model.layers",
    "gpt_neox": "gpt_neox.layers",
    "gpt2": "transformer.h",
}
KEPT = [0, 2, 3, 5]  # of 6 layers: drops 1 and 4, so both a head-side and a tail-side gap


def hand_built_reference(full: nn.Module, kept: list[int]) -> nn.Module:
    """A fresh model built from a hand-edited config with the kept layers' weights renamed by hand."""
    from transformers import AutoModelForCausalLM

    prefix, _ = find_decoder_layers(full)
    config = copy.deepcopy(full.config)
    layer_types = getattr(config, "layer_types", None)
    config.num_hidden_layers = len(kept)
    if layer_types is not None:
        config.layer_types = [layer_types[k] for k in kept]
    reference = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = {}
    for key, value in full.state_dict().items():
        if key.startswith(prefix + "."):
            index, rest = key[len(prefix) + 1 :].split(".", 1)
            if int(index) not in kept:
                continue
            key = f"{prefix}.{kept.index(int(index))}.{rest}"
        state[key] = value
    reference.load_state_dict(state, strict=True)
    return reference


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_layers_generic(arch):
    model = tiny_model(arch)
    prefix, layers = find_decoder_layers(model)
    assert prefix == EXPECTED_PREFIX[arch]
    assert len(layers) == 6
    assert model.get_submodule(prefix) is layers


def test_unsupported_model_names_what_is_missing():
    model = nn.Module()
    model.config = SimpleNamespace(num_hidden_layers=3)
    model.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    with pytest.raises(ModelError) as excinfo:
        find_decoder_layers(model)
    message = str(excinfo.value)
    assert "num_hidden_layers=3" in message and "blocks[2 x Linear]" in message

    bare = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ModelError, match="no nn.ModuleList at all"):
        find_decoder_layers(bare)


def test_mixed_module_list_is_not_taken_for_layers():
    model = nn.Module()
    model.config = SimpleNamespace(num_hidden_layers=2)
    model.mixed = nn.ModuleList([nn.Linear(2, 2), nn.ReLU()])
    model.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    assert find_decoder_layers(model)[0] == "blocks"


@pytest.mark.parametrize("arch", ARCHS)
def test_submodel_forward_equals_hand_built_reference(arch):
    full = tiny_model(arch)
    before = {k: v.clone() for k, v in full.state_dict().items()}
    sub = build_submodel(full, KEPT)
    reference = hand_built_reference(full, KEPT)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = sub(input_ids=ids).logits
        want = reference(input_ids=ids).logits
        # Second reference: the full model with the dropped layers made identity.
        with skip_layers(full, [1, 4]):
            skipped = full(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    torch.testing.assert_close(got, skipped, rtol=0, atol=1e-6)
    # The full model is untouched: same layers, same weights, same indices.
    assert len(find_decoder_layers(full)[1]) == 6 and full.config.num_hidden_layers == 6
    assert all(torch.equal(before[k], v) for k, v in full.state_dict().items())


@pytest.mark.parametrize("arch", ARCHS)
def test_surgery_fixes_indices_and_config(arch):
    full = tiny_model(arch)
    sub = build_submodel(full, KEPT)
    prefix, layers = find_decoder_layers(sub)
    assert prefix == EXPECTED_PREFIX[arch] and len(layers) == len(KEPT)
    assert sub.config.num_hidden_layers == len(KEPT)
    assert layer_map_of(sub) == KEPT and layer_map_of(full) == list(range(6))
    # Pruning again composes the maps: indices keep referring to the original model.
    assert layer_map_of(build_submodel(sub, [0, 2, 3])) == [0, 3, 5]
    for i, layer in enumerate(layers):
        indices = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)}
        assert indices == {i}, f"layer {i} still carries indices {indices}"
    _, full_layers = find_decoder_layers(full)
    assert {m.layer_idx for m in full_layers[5].modules() if isinstance(getattr(m, "layer_idx", None), int)} == {5}
    if getattr(full.config, "layer_types", None) is not None:
        assert sub.config.layer_types == [full.config.layer_types[k] for k in KEPT]
    # The edited config rebuilds the same architecture (what a package reload relies on).
    reloaded = type(sub.config).from_dict(sub.config.to_dict())
    assert reloaded.num_hidden_layers == len(KEPT)


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_generation_after_pruning(arch):
    full = tiny_model(arch)
    sub = build_submodel(full, KEPT)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = sub(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        assert len(cache.layers) == len(KEPT)
        assert cache.get_seq_length() == 5
        # One cached step equals recomputing the whole sequence.
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = sub(input_ids=nxt, past_key_values=cache, use_cache=True).logits[:, -1]
        full_seq = sub(input_ids=torch.cat([ids, nxt], 1), use_cache=False).logits[:, -1]
        torch.testing.assert_close(step, full_seq, rtol=1e-4, atol=1e-5)
        generated = sub.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        # Greedy decoding by hand, without any cache.
        manual = ids
        for _ in range(8):
            logits = sub(input_ids=manual, use_cache=False).logits[:, -1]
            manual = torch.cat([manual, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(generated, manual)


def test_real_smollm_submodel_matches_manual_layer_loop(smol):
    """On real weights, the sub-LLM equals running the full model's kept layers by hand."""
    model, tokenizer = smol
    kept = [0, 2, 3]
    sub = build_submodel(model, kept)
    batch = tokenizer(["The capital of France is Paris.", "Hello"], return_tensors="pt", padding=True)
    ids = batch["input_ids"][:1]
    with torch.no_grad():
        inner = model.model
        hidden = inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rope = inner.rotary_emb(hidden, positions)
        for k in kept:
            out = inner.layers[k](hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
        manual = model.lm_head(inner.norm(hidden))
        got = sub(input_ids=ids).logits
        # Padding-aware batch through the sub-LLM gives the same logits on the real tokens.
        padded = sub(**batch).logits[:1, : ids.shape[1]]
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(padded, manual, rtol=1e-5, atol=1e-4)


def test_capture_layer_io_records_raw_layer_outputs(smol):
    model, tokenizer = smol
    batch = tokenizer(["A short sentence about the sea."], return_tensors="pt")
    with torch.no_grad(), capture_layer_io(model, inputs=True) as captured:
        out = model(**batch, output_hidden_states=True)
    hs = out.hidden_states
    torch.testing.assert_close(captured["input"], hs[0])
    for i in range(len(hs) - 2):
        torch.testing.assert_close(captured[i], hs[i + 1])
    # The last entry of output_hidden_states is post-norm; the capture is the raw layer output.
    last = len(hs) - 2
    torch.testing.assert_close(model.model.norm(captured[last]), hs[-1])


def test_layer_map_validation(smol):
    model, _ = smol
    for bad in ([], [0, 0, 1], [2, 1], [0, 9]):
        with pytest.raises(ModelError):
            build_submodel(model, bad)


def test_gpt2_layer_index_scaled_attention_is_refused():
    full = tiny_model("gpt2")
    full.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx"):
        build_submodel(full, [0, 1])
