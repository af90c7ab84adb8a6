"""Sub-LLM packages: NF4 / bf16 / fp32 round trips, integrity, chunk reuse, 4-bit training gradients."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from coordinator.model.packaging import prepare_package_model, write_package
from coordinator.model.surgery import build_submodel, find_decoder_layers
from shared.errors import BlobError, ModelError
from shared.manifests import build_manifest
from shared.subllm import (
    EMBEDDING_FILE,
    INDEX_FILE,
    META_FILE,
    REST_SHARD,
    PackageMeta,
    dequantize_embedding,
    layer_shard_name,
    load_package,
    read_meta,
)
from tests.coordinator.arch_models import VOCAB, tiny_model

KEPT = [0, 2, 3]
PROMPTS = ["The old lighthouse keeper climbed the stairs every evening.", "Rain"]


@pytest.fixture(scope="module")
def sub(smol):
    model, _ = smol
    return build_submodel(model, KEPT)


@pytest.fixture(scope="module")
def nf4_package(smol, sub, tmp_path_factory):
    _, tokenizer = smol
    prepared = prepare_package_model(sub, "nf4")
    folder = tmp_path_factory.mktemp("pkg") / "nf4"
    meta = write_package(prepared, tokenizer, KEPT, "L3", 1, folder, "nf4", name="smol-cut", full_num_layers=4)
    return prepared, folder, meta


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_nf4_package_round_trip_gives_identical_logits(smol, nf4_package):
    _, tokenizer = smol
    prepared, folder, meta = nf4_package
    loaded, loaded_tokenizer, loaded_meta = load_package(folder)
    assert loaded_meta == meta
    assert loaded_tokenizer.pad_token is not None
    assert torch.equal(logits(prepared, tokenizer), logits(loaded, loaded_tokenizer))
    _, layers = find_decoder_layers(loaded)
    four_bit = [m for m in loaded.modules() if type(m).__name__ == "Linear4bit"]
    assert len(four_bit) == 7 * len(KEPT)  # q k v o gate up down per layer; the head stays dense
    assert all(m.support_avx512bf16_for_cpu is False for m in four_bit)
    assert all(m.weight.quant_state.quant_type == "nf4" for m in four_bit)
    assert len(layers) == len(KEPT) and loaded.config.num_hidden_layers == len(KEPT)


def test_nf4_package_is_a_transformers_folder_plus_a_4bit_embedding_table(smol, nf4_package):
    """transformers itself loads the pre-quantized package on CPU; with the NF4 table filled in
    from its own file (tied head included), the logits are the same."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, tokenizer = smol
    prepared, folder, _ = nf4_package
    plain = AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}, dtype=torch.float32)
    table = dequantize_embedding(load_file(str(folder / EMBEDDING_FILE)), "model.embed_tokens.weight")
    plain.get_input_embeddings().weight.data = table
    assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
    for module in plain.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False
    # transformers keeps the stored bf16 of embeddings/norms; compare after the same upcast.
    for param in plain.parameters():
        if param.dtype == torch.bfloat16:
            param.data = param.data.float()
    assert torch.equal(logits(prepared, tokenizer), logits(plain, tokenizer))


def test_package_layout_and_meta(nf4_package):
    _, folder, meta = nf4_package
    names = {p.name for p in folder.iterdir()}
    assert {layer_shard_name(k) for k in KEPT} | {REST_SHARD, EMBEDDING_FILE, INDEX_FILE, META_FILE, "config.json", "tokenizer.json"} <= names
    assert layer_shard_name(1) not in names
    assert meta.layer_map == tuple(KEPT) and meta.tier == "L3" and meta.version == 1 and meta.precision == "nf4"
    assert meta.layers_prefix == "model.layers" and meta.full_num_layers == 4 and meta.model_type == "llama"
    assert set(meta.files) == names - {META_FILE}
    index = json.loads((folder / INDEX_FILE).read_text())
    # Sub-LLM layer 1 is full layer 2: its tensors live in the file named by the full index.
    assert index["weight_map"]["model.layers.1.self_attn.q_proj.weight"] == layer_shard_name(2)
    # The NF4 embedding table is outside the index (transformers cannot load it); the tied head
    # is not stored at all.
    assert "model.embed_tokens.weight" not in index["weight_map"] and "lm_head.weight" not in index["weight_map"]
    assert meta.embedding_precision == "nf4"
    vocab, hidden = 49152, 576
    stored = (folder / EMBEDDING_FILE).stat().st_size
    # 4 bits per value plus one fp32 scale per 32 values (and a small header).
    assert vocab * hidden // 2 + vocab * hidden // 32 * 4 <= stored < vocab * hidden // 2 + vocab * hidden // 32 * 4 + 4096
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert read_meta(folder) == meta
    assert json.loads(json.dumps(meta.to_dict()))["layer_map"] == KEPT


def test_corrupt_or_missing_files_are_detected(nf4_package, tmp_path):
    import shutil

    _, folder, _ = nf4_package
    copy_dir = tmp_path / "pkg"
    shutil.copytree(folder, copy_dir)
    shard = copy_dir / layer_shard_name(2)
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(BlobError, match="corrupt"):
        load_package(copy_dir)
    shard.unlink()
    with pytest.raises(BlobError, match="missing"):
        load_package(copy_dir)
    (copy_dir / META_FILE).unlink()
    with pytest.raises(ModelError, match="not a sub-LLM package"):
        load_package(copy_dir)


def test_realigned_version_shares_unchanged_layer_chunks(smol, sub, nf4_package, tmp_path):
    _, tokenizer = smol
    _, folder_v1, _ = nf4_package
    realigned = build_submodel(smol[0], KEPT)
    with torch.no_grad():  # what ODA does: only the bridge layer (sub 1 = full 2) changes
        find_decoder_layers(realigned)[1][1].mlp.up_proj.weight.mul_(1.01)
    folder_v2 = tmp_path / "v2"
    write_package(realigned, tokenizer, KEPT, "L3", 2, folder_v2, "nf4", name="smol-cut", full_num_layers=4)
    v1 = {f.path: f.chunks for f in build_manifest(folder_v1, "m", 1, "L3").files}
    v2 = {f.path: f.chunks for f in build_manifest(folder_v2, "m", 2, "L3").files}
    changed = {path for path in v1 if v1[path] != v2[path]}
    assert changed == {layer_shard_name(2), META_FILE}
    chunks_v1 = {c for chunks in v1.values() for c in chunks}
    new_chunks = [c for chunks in v2.values() for c in chunks if c not in chunks_v1]
    assert 0 < len(new_chunks) <= len(v2[layer_shard_name(2)]) + len(v2[META_FILE])


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_dense_precision_packages_round_trip(smol, sub, precision, tmp_path):
    _, tokenizer = smol
    prepared = prepare_package_model(sub, precision)
    meta = write_package(prepared, tokenizer, KEPT, "L3", 1, tmp_path, precision)
    loaded, _, loaded_meta = load_package(tmp_path)
    assert loaded_meta.precision == precision == meta.precision
    assert not any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    assert loaded.get_input_embeddings().weight.dtype == want
    assert torch.equal(logits(prepared, tokenizer), logits(loaded, tokenizer))
    if precision == "fp32":  # fp32 is lossless: the package is the sub-LLM itself
        assert torch.equal(logits(sub, tokenizer), logits(loaded, tokenizer))


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_other_architectures_package_round_trip(smol, arch, tmp_path):
    """Qwen2 (attention biases) and GPT-2 (Conv1D layers, ``transformer.h``) pruned and 4-bit packaged."""
    _, tokenizer = smol
    full = tiny_model(arch, num_layers=4)
    sub_model = build_submodel(full, [0, 3])
    prepared = prepare_package_model(sub_model, "nf4")
    meta = write_package(prepared, tokenizer, [0, 3], "L2", 1, tmp_path, "nf4")
    loaded, _, _ = load_package(tmp_path)
    assert meta.layers_prefix == ("transformer.h" if arch == "gpt2" else "model.layers")
    assert any(type(m).__name__ == "Linear4bit" for m in loaded.modules())
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(prepared(input_ids=ids).logits, loaded(input_ids=ids).logits)
        # 4-bit stays close to the float sub-LLM (sanity that the weights went where they belong).
        dense = sub_model(input_ids=ids).logits
        assert (loaded(input_ids=ids).logits - dense).abs().max() < 0.5 * dense.abs().max()


def dequantized_copy(model4: nn.Module) -> nn.Module:
    """The same model with every 4-bit layer replaced by a float32 Linear holding the dequantized weight."""
    import copy

    import bitsandbytes as bnb

    reference = copy.deepcopy(model4)
    for name, module in list(reference.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            dense.weight.data = weight.float().clone()
            if module.bias is not None:
                dense.bias.data = module.bias.data.float().clone()
            parent_name, _, child = name.rpartition(".")
            setattr(reference.get_submodule(parent_name), child, dense)
    return reference


def test_gradients_after_eval_pass_on_4bit_match_unquantized_reference(smol, nf4_package):
    """The AVX512_BF16 trap: evaluate under no_grad first, then train; LoRA gradients must stay right.

    On a CPU with AVX512_BF16 an unpatched bitsandbytes layer repacks its weight during the
    no-grad pass and later gradients come out wrong; load_package's workaround prevents it.
    On other CPUs the same check still guards the 4-bit training path.
    """
    from peft import LoraConfig, get_peft_model

    _, tokenizer = smol
    _, folder, _ = nf4_package
    model4, _, _ = load_package(folder)
    reference = dequantized_copy(model4)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    torch.manual_seed(0)
    peft4 = get_peft_model(model4, config)
    peft_ref = get_peft_model(reference, config)
    with torch.no_grad():
        ref_params = dict(peft_ref.named_parameters())
        for name, param in peft4.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn_like(param) * 0.1)  # B != 0 so every LoRA tensor gets a gradient
                ref_params[name].copy_(param)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    for model in (peft4, peft_ref):
        model.eval()
        with torch.no_grad():
            model(**batch)  # the eval pass that would trigger the repacking
    torch.testing.assert_close(
        peft4(**batch).logits.detach(), peft_ref(**batch).logits.detach(), rtol=1e-4, atol=1e-3
    )
    for model in (peft4, peft_ref):
        model.train()
        model(**batch, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in peft4.named_parameters() if p.requires_grad}
    ref_grads = {n: p.grad for n, p in peft_ref.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 3 * len(KEPT)
    for name, grad in grads.items():
        assert grad is not None, f"{name} got no gradient"
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_client_side_loading_does_not_import_the_coordinator(nf4_package):
    _, folder, _ = nf4_package
    code = (
        "import sys; from shared.subllm import load_package; "
        f"m, t, meta = load_package({str(folder)!r}); "
        "assert not any(k == 'coordinator' or k.startswith('coordinator.') for k in sys.modules), 'coordinator imported'; "
        "print(meta.tier)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[2], timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("L3")


def test_format_1_meta_means_16bit_embeddings_and_a_bad_table_is_named(nf4_package, tmp_path):
    _, folder, meta = nf4_package
    old = {k: v for k, v in meta.to_dict().items() if k != "embedding_precision"} | {"format_version": 1}
    assert PackageMeta.from_dict(old).embedding_precision == "bf16"
    with pytest.raises(ModelError, match="unknown embedding precision 'int3'"):
        PackageMeta.from_dict(meta.to_dict() | {"embedding_precision": "int3"})
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / EMBEDDING_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ModelError, match=f"cannot read {EMBEDDING_FILE}"):
        load_package(broken, verify=False)
