"""Integration: a sub-LLM adapter mapped to full-LLM layers, loaded with PEFT, merged."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from coordinator.model.export import (
    export_adapter,
    load_exported_adapter,
    merge_adapter,
)
from coordinator.model.surgery import build_submodel, skip_layers
from shared.adapters import LoraSettings, to_full_keys
from shared.errors import TensorError
from tests.coordinator.arch_models import VOCAB, tiny_model

KEPT = [0, 2, 3]
LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"))


def trained_sub_adapter(sub, lora: LoraSettings, seed: int = 0):
    """PEFT on the sub-LLM with random non-zero A and B (as if trained); returns (peft model, state)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    peft_sub = get_peft_model(
        copy.deepcopy(sub),
        LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0, target_modules=list(lora.target_modules)),
    )
    with torch.no_grad():
        for name, param in peft_sub.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    return peft_sub.eval(), {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_sub).items()}


def test_exported_adapter_loads_on_the_right_full_layers(smol, tmp_path):
    from peft import get_peft_model_state_dict

    full, tokenizer = smol
    sub = build_submodel(full, KEPT)
    peft_sub, state = trained_sub_adapter(sub, LORA)
    export_adapter(state, full, tmp_path, LORA, layer_map=KEPT)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["layers_to_transform"] == KEPT and config["layers_pattern"] == "layers"
    assert config["r"] == 4 and config["lora_alpha"] == 8.0

    loaded = load_exported_adapter(copy.deepcopy(full), tmp_path)
    loaded_state = get_peft_model_state_dict(loaded)
    expected = to_full_keys(state, KEPT, "model.layers")
    assert loaded_state.keys() == expected.keys()
    for key, tensor in expected.items():  # tensor by tensor, on the mapped layer
        assert torch.equal(loaded_state[key], tensor), key
    # Sub-LLM layer 1 went to full layer 2; full layer 1 got no LoRA at all.
    assert torch.equal(
        loaded.base_model.model.model.layers[2].self_attn.q_proj.lora_A["default"].weight,
        peft_sub.base_model.model.model.layers[1].self_attn.q_proj.lora_A["default"].weight,
    )
    assert type(loaded.base_model.model.model.layers[1].self_attn.q_proj).__name__ == "Linear"
    # End to end: full LLM + adapter with the pruned layer skipped == sub-LLM + adapter.
    batch = tokenizer(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        want = peft_sub(**batch).logits
        with skip_layers(loaded, [1]):
            got = loaded(**batch).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_merge_adapter_adds_the_lora_update(smol, tmp_path):
    full, _ = smol
    sub = build_submodel(full, KEPT)
    _, state = trained_sub_adapter(sub, LORA, seed=1)
    export_adapter(state, full, tmp_path, LORA, layer_map=KEPT)
    merged = merge_adapter(copy.deepcopy(full), tmp_path)
    assert type(merged) is type(full)
    full_state = full.state_dict()
    merged_state = merged.state_dict()
    assert merged_state.keys() == full_state.keys()
    for sub_i, full_k in enumerate(KEPT):
        for module in ("q_proj", "v_proj"):
            a = state[f"base_model.model.model.layers.{sub_i}.self_attn.{module}.lora_A.weight"]
            b = state[f"base_model.model.model.layers.{sub_i}.self_attn.{module}.lora_B.weight"]
            key = f"model.layers.{full_k}.self_attn.{module}.weight"
            torch.testing.assert_close(merged_state[key], full_state[key] + LORA.scaling * b @ a, rtol=1e-5, atol=1e-6)
    untouched = [k for k in full_state if k.startswith("model.layers.1.") or "mlp" in k or "norm" in k]
    assert untouched and all(torch.equal(merged_state[k], full_state[k]) for k in untouched)


def test_export_on_gpt2_conv1d_layers(tmp_path):
    """A non-Llama model: GPT-2's fused Conv1D attention under ``transformer.h``."""
    from peft import get_peft_model_state_dict

    lora = LoraSettings(rank=2, alpha=4.0, dropout=0.0, target_modules=("c_attn",))
    full = tiny_model("gpt2", num_layers=4)
    sub = build_submodel(full, [0, 3])
    peft_sub, state = trained_sub_adapter(sub, lora)
    export_adapter(state, full, tmp_path, lora, layer_map=[0, 3])
    loaded = load_exported_adapter(copy.deepcopy(full), tmp_path)
    loaded_state = get_peft_model_state_dict(loaded)
    assert sorted(loaded_state) == sorted(to_full_keys(state, [0, 3], "transformer.h"))
    ids = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), skip_layers(loaded, [1, 2]):
        torch.testing.assert_close(loaded(input_ids=ids).logits, peft_sub(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_export_rejects_bad_adapters(smol, tmp_path):
    full, _ = smol
    _, state = trained_sub_adapter(build_submodel(full, KEPT), LORA)
    full_state = to_full_keys(state, KEPT, "model.layers")
    with pytest.raises(TensorError, match="empty"):
        export_adapter({}, full, tmp_path, LORA)
    bad = dict(full_state)
    bad["base_model.model.model.layers.2.self_attn.nope.lora_A.weight"] = torch.zeros(4, 4)
    with pytest.raises(TensorError, match="does not have"):
        export_adapter(bad, full, tmp_path, LORA)
    partial = {k: v for k, v in full_state.items() if not k.startswith("base_model.model.model.layers.2.self_attn.v_proj")}
    with pytest.raises(TensorError, match=r"layer 2 lacks LoRA tensors for \['v_proj'\]"):
        export_adapter(partial, full, tmp_path, LORA)
    with pytest.raises(TensorError, match="not one of the target modules"):
        export_adapter(full_state, full, tmp_path, LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj",)))
