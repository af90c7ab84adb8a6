"""Model preparation (edge_client.lora): LoRA attached and removed, the start adapter loaded,
4-bit models checked, on a real 4-layer cut of SmolLM2 and real Rotten Tomatoes sentences.

The 4-bit tests load NF4 weights with bitsandbytes on the CPU and apply the AVX512_BF16
workaround right after (``shared.subllm.disable_cpu_4bit_repacking``, which ``load_package`` uses).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from coordinator.model.models import load_model
from edge_client.data import LocalDataset, batch_indices, make_batch
from edge_client.lora import adapter_parameters, attach_lora, detach_lora
from edge_client.trainer import TrainOptions, round_seed, train_adapter
from shared.errors import DataError, ModelError
from shared.subllm import disable_cpu_4bit_repacking
from shared.tasks import TaskSpec
from tests.edge_client.helpers import (
    PREFIX,
    SUB_MAP,
    TARGETS,
    has_lora,
    make_params,
    random_global_adapter,
)


def _load_nf4(path: Path) -> torch.nn.Module:
    """NF4 on CPU via transformers, with the AVX512_BF16 workaround applied right after loading."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    assert disable_cpu_4bit_repacking(model) == 28  # 4 layers x 7 projections
    return model


def _dequantized_copy(nf4: torch.nn.Module, path: Path) -> torch.nn.Module:
    """An fp32 model whose linear weights are exactly the NF4 weights, dequantized."""
    import bitsandbytes as bnb

    ref, _ = load_model(path)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, module in nf4.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                modules[name].weight.copy_(weight.float())
    return ref


def test_global_adapter_is_loaded_and_used(fp32, rt_dataset):
    """With lr 0 the first step's loss must equal the loss of the base model with the global
    adapter merged into its weights by hand (independent of PEFT), and the delta must be 0."""
    model, tokenizer = fp32
    params = make_params(local_steps=1, learning_rate=0.0)
    global_adapter = random_global_adapter(SUB_MAP + [5])  # layer 5 is not in this sub-LLM: ignored
    result = train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu")
    assert all(torch.count_nonzero(v) == 0 for v in result.delta.values())

    merged = copy.deepcopy(model)
    scaling = params.lora_alpha / params.lora_rank
    with torch.no_grad():
        for sub, full in enumerate(SUB_MAP):
            for module in TARGETS:
                key = f"base_model.model.model.layers.{full}.self_attn.{module}"
                linear = getattr(merged.model.layers[sub].self_attn, module)
                linear.weight += scaling * global_adapter[f"{key}.lora_B.weight"] @ global_adapter[f"{key}.lora_A.weight"]
    indices = batch_indices(len(rt_dataset), params.batch_size, round_seed(params.seed, 0), 0)
    batch = make_batch(rt_dataset, tokenizer, indices, params.seq_len)
    with torch.no_grad():
        expected = merged(**batch).loss.item()
        bare = model(**batch).loss.item()
    assert result.metrics["loss_first"] == pytest.approx(expected, rel=1e-5)
    assert abs(bare - expected) > 1e-3  # the adapter changes the loss, so the check above has teeth


def test_global_adapter_that_does_not_fit_is_refused(fp32, rt_dataset):
    model, tokenizer = fp32
    params = make_params(local_steps=1)
    with pytest.raises(ModelError, match="shape"):
        train_adapter(model, tokenizer, rt_dataset, params, random_global_adapter(SUB_MAP, rank=4), SUB_MAP, PREFIX, "cpu")
    with pytest.raises(ModelError, match="missing"):
        train_adapter(model, tokenizer, rt_dataset, params, random_global_adapter(SUB_MAP[:2]), SUB_MAP, PREFIX, "cpu")
    broken = random_global_adapter(SUB_MAP)
    next(iter(broken.values()))[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        train_adapter(model, tokenizer, rt_dataset, params, broken, SUB_MAP, PREFIX, "cpu")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ModelError, match="target modules"):
        train_adapter(model, tokenizer, rt_dataset, make_params(target_modules=["no_such_proj"]), None, SUB_MAP, PREFIX, "cpu")
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(DataError, match="no examples"):
        train_adapter(model, tokenizer, LocalDataset(TaskSpec.for_kind("generation"), (), "empty"), params, None, SUB_MAP, PREFIX, "cpu")
    assert not has_lora(model)


def test_gradient_checkpointing_gives_the_same_result(fp32, rt_dataset):
    model, tokenizer = fp32
    params = make_params(local_steps=2)
    plain = train_adapter(model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu")
    ckpt = train_adapter(model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu", options=TrainOptions(gradient_checkpointing=True))
    for key, value in plain.delta.items():
        torch.testing.assert_close(ckpt.delta[key], value, atol=1e-6, rtol=1e-4)
    assert not model.is_activation_checkpointing


def test_refuses_a_model_that_already_has_an_adapter(fp32):
    model, _ = fp32
    peft_model = attach_lora(model, make_params())
    try:
        with pytest.raises(ModelError, match="already carries"):
            attach_lora(peft_model, make_params())
    finally:
        detach_lora(peft_model)
        for p in model.parameters():
            p.requires_grad_(True)


def test_nf4_lora_gradients_after_an_eval_pass_match_a_dequantized_reference(tiny_model_dir, rt_dataset):
    """No-grad eval first (the AVX512_BF16 trap), then train: LoRA gradients on NF4 must match
    an fp32 model holding the same dequantized weights, and so must a trainer step."""
    nf4 = _load_nf4(tiny_model_dir)
    ref = _dequantized_copy(nf4, tiny_model_dir)
    tokenizer = load_model(tiny_model_dir)[1]
    batch = make_batch(rt_dataset, tokenizer, [0, 1], 64)
    nf4.eval()
    with torch.no_grad():
        nf4(**batch)
    params = make_params(local_steps=1, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])

    grads = []
    for model in (nf4, ref):
        peft_model = attach_lora(model, params)
        adapter = adapter_parameters(peft_model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter.values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_model.train()
        peft_model(**batch).loss.backward()
        grads.append({k: p.grad.clone() for k, p in adapter.items()})
        detach_lora(peft_model)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 32
    for key, expected in grads[1].items():
        assert expected.norm() > 0
        assert (grads[0][key] - expected).norm() <= 1e-4 * expected.norm(), key

    # The same through train_adapter, after another eval pass on the NF4 model.
    nf4.eval()
    with torch.no_grad():
        nf4(**batch)
    params = make_params(local_steps=2, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    runs = [train_adapter(m, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu") for m in (nf4, ref)]
    assert runs[0].metrics["grad_norm_first"] == pytest.approx(runs[1].metrics["grad_norm_first"], rel=1e-4)
    assert runs[0].metrics["loss_last"] == pytest.approx(runs[1].metrics["loss_last"], rel=1e-4)
    for key, value in runs[1].delta.items():
        torch.testing.assert_close(runs[0].delta[key], value, atol=1e-5, rtol=1e-3)
    assert not has_lora(nf4)


def test_nf4_weights_repacked_by_an_unprotected_eval_are_refused(tiny_model_dir, rt_dataset):
    """Without the workaround an eval pass repacks the weights (forced here with the flag, since
    this CPU may lack AVX512_BF16); training must then refuse instead of computing wrong grads."""
    import bitsandbytes as bnb

    nf4 = _load_nf4(tiny_model_dir)
    for module in nf4.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    tokenizer = load_model(tiny_model_dir)[1]
    nf4.eval()
    with torch.no_grad():
        nf4(**make_batch(rt_dataset, tokenizer, [0, 1], 64))
    with pytest.raises(ModelError, match="repacked for CPU inference"):
        train_adapter(nf4, tokenizer, rt_dataset, make_params(local_steps=1), None, SUB_MAP, PREFIX, "cpu")
