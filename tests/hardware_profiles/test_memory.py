"""The memory estimator: saved activations against autograd, breakdown, monotonicity, load peak.

These run the real (cut) SmolLM2 and tiny random-weight GPT-2 / Qwen2 models on CPU; the end-to-end accuracy check against measured peak
RSS is benchmarks/memory_estimator.py (too slow for unit tests).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks.reference_configs import GPT2, QWEN2_05B
from hardware_profiles.memory import (
    MemoryEstimate,
    estimate_training_memory,
    layer_activation_tensors,
)
from hardware_profiles.shape import model_shape
from hardware_profiles.training_setup import TrainingSetup
from shared.errors import ConfigError

from .conftest import LLAMA_7B


def _saved_activation_bytes(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saved, leaving out parameters and the logits."""
    out = model(**batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = 0
    stack, visited = [out.loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:
                continue
            if isinstance(value, torch.Tensor) and value.numel() > 1:
                ptr = value.untyped_storage().data_ptr()
                if ptr not in seen and ptr not in params:
                    seen.add(ptr)
                    total += value.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    vocab = out.logits.shape[-1]
    return total - batch["input_ids"].numel() * vocab * 4  # the saved log-softmax (counted in `logits`)


@pytest.mark.parametrize(
    ("targets", "dropout", "dtype"),
    [
        (("q_proj", "v_proj"), 0.0, "fp32"),
        (("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 0.0, "fp32"),
        (("q_proj", "k_proj", "v_proj", "o_proj"), 0.1, "fp32"),
        (("q_proj", "v_proj"), 0.0, "bf16"),
    ],
)
def test_activation_formula_matches_what_autograd_saves(tiny_model_dir: Path, targets, dropout: float, dtype: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch_dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_dropout=dropout, target_modules=list(targets)))
    model.train()
    b, t = 2, 48
    ids = torch.randint(0, 1000, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # padded, as the client's batches are
    measured = _saved_activation_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})

    shape = model_shape(tiny_model_dir)
    setup = TrainingSetup(precision=dtype, lora_targets=targets, lora_dropout=dropout, batch_size=b, seq_len=t)
    per_layer = sum(bytes_ * count for bytes_, count in layer_activation_tensors(shape, setup)) * b * t
    cb = 4 if dtype == "fp32" else 2
    predicted = shape.num_layers * per_layer + b * t * shape.hidden_size * 4 + b * t * t * cb
    assert predicted == pytest.approx(measured, rel=0.08)
    # The estimate's activation term is this same prediction.
    est = estimate_training_memory(tiny_model_dir, setup)
    assert est.breakdown["activations"] == predicted


def test_estimate_breakdown_and_plain_dict(tiny_model_dir: Path) -> None:
    est = estimate_training_memory(tiny_model_dir, TrainingSetup(precision="fp32", batch_size=2, seq_len=32))
    assert isinstance(est, MemoryEstimate) and est.device == "cpu"
    train = sum(v for k, v in est.breakdown.items() if k not in ("framework", "load_peak"))
    assert est.total_bytes == est.breakdown["framework"] + max(train, est.breakdown["load_peak"])
    plain = est.to_dict()
    assert json.loads(json.dumps(plain)) == plain
    assert plain["setup"]["num_layers"] == 4


def test_estimate_grows_and_shrinks_the_right_way() -> None:
    base = TrainingSetup(num_layers=16, precision="bf16", batch_size=4, seq_len=256, device="cuda")

    def total(**kw) -> int:
        return estimate_training_memory(LLAMA_7B, replace(base, **kw)).total_bytes

    reference = total()
    assert total(num_layers=24) > reference > total(num_layers=8)
    assert total(batch_size=8) > reference > total(batch_size=2)
    assert total(seq_len=512) > reference
    assert total(lora_rank=64) > reference
    assert total(grad_checkpointing=True) < reference
    assert total(precision="fp32") > reference > total(precision="int8") > total(precision="nf4")
    assert total(optimizer="sgd") < reference
    assert total(device="cuda", unified_memory=True) > reference  # the host process shares the memory


def test_nf4_weights_are_about_a_quarter_of_bf16_for_big_models() -> None:
    nf4 = estimate_training_memory(LLAMA_7B, TrainingSetup(precision="nf4", device="cuda")).breakdown["weights"]
    bf16 = estimate_training_memory(LLAMA_7B, TrainingSetup(precision="bf16", device="cuda")).breakdown["weights"]
    # Embedding and lm_head stay fp32 (prepare_model_for_kbit_training); the rest is 4-bit.
    assert 3.5e9 < nf4 < 5.0e9 and 13.0e9 < bf16 < 13.8e9


def test_loading_a_converted_checkpoint_can_set_the_peak(tiny_model_dir: Path) -> None:
    lean = TrainingSetup(precision="bf16", batch_size=1, seq_len=8)
    same = estimate_training_memory(tiny_model_dir, lean)
    converted = estimate_training_memory(tiny_model_dir, replace(lean, checkpoint_precision="fp32"))
    assert converted.peak_phase == "load" and converted.total_bytes > same.total_bytes


def test_more_layers_than_the_model_has_is_an_error(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="only 4"):
        estimate_training_memory(tiny_model_dir, TrainingSetup(num_layers=5))


# --------------------------------------------------------------------------- other architectures

TINY_GPT2 = {
    # GPT-2's code paths (Conv1D, LayerNorm, gelu_new, dropout 0.1 on attention probabilities,
    # residuals and embeddings, tied head) at a width a test builds in a second.
    **GPT2, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128, "n_ctx": 128, "vocab_size": 1000,
}
TINY_QWEN2_UNTIED = {
    **QWEN2_05B, "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 1000, "tie_word_embeddings": False,
}


def _random_model(config: dict, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    data = dict(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(data.pop("model_type"), **data), dtype=dtype)


@pytest.mark.parametrize(
    ("targets", "dropout", "dtype"),
    [
        (("c_attn",), 0.0, "fp32"),
        (("c_attn", "c_proj", "c_fc"), 0.0, "fp32"),
        (("c_attn",), 0.1, "fp32"),
        (("c_attn",), 0.0, "bf16"),
    ],
)
def test_gpt2_activations_match_what_autograd_saves(targets, dropout: float, dtype: str) -> None:
    # GPT-2 saves what a Llama layer does not: the math-path attention's probability matrices
    # (softmax, dropout mask, dropped probabilities), residual dropout masks, gelu_new's four
    # intermediates, LayerNorm inputs in the compute dtype, the embedding dropout mask.
    from peft import LoraConfig, get_peft_model

    torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
    model = get_peft_model(_random_model(TINY_GPT2, torch_dtype), LoraConfig(r=8, lora_dropout=dropout, target_modules=list(targets)))
    model.train()
    b, t = 2, 48
    ids = torch.randint(0, 1000, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    measured = _saved_activation_bytes(model, {"input_ids": ids, "attention_mask": mask, "labels": ids})

    setup = TrainingSetup(precision=dtype, lora_targets=targets, lora_dropout=dropout, batch_size=b, seq_len=t)
    est = estimate_training_memory(TINY_GPT2, setup)
    mask_bytes = b * t * t * (4 if dtype == "fp32" else 2)
    # Without the new terms the estimate would be well under half of this.
    assert est.breakdown["activations"] - mask_bytes == pytest.approx(measured, rel=0.08)


def test_gpt2_shape_reads_the_architecture() -> None:
    shape = model_shape(TINY_GPT2)
    assert shape.layer_norm and shape.activation == "gelu_new" and not shape.gated_mlp
    assert shape.attention_dropout == shape.residual_dropout == shape.embedding_dropout == 0.1
    assert [lin.name for lin in shape.layer_linears] == ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    # Without dropout the fused attention path is back: no seq_len x seq_len matrices.
    quiet = estimate_training_memory({**TINY_GPT2, "attn_pdrop": 0.0}, TrainingSetup(batch_size=2, seq_len=64))
    noisy = estimate_training_memory(TINY_GPT2, TrainingSetup(batch_size=2, seq_len=64))
    assert noisy.breakdown["activations"] > quiet.breakdown["activations"]


def test_untied_head_is_counted_in_weights_and_load() -> None:
    tied = {**TINY_QWEN2_UNTIED, "tie_word_embeddings": True}
    untied_shape, tied_shape = model_shape(TINY_QWEN2_UNTIED), model_shape(tied)
    assert tied_shape.lm_head_params == 0 and untied_shape.lm_head_params == 1000 * 64
    model = _random_model(TINY_QWEN2_UNTIED, torch.float32)
    assert untied_shape.total_params() == sum(p.numel() for p in model.parameters())
    for precision in ("fp32", "nf4"):
        setup = TrainingSetup(precision=precision, batch_size=1, seq_len=16, checkpoint_precision="fp32")
        a, b = estimate_training_memory(TINY_QWEN2_UNTIED, setup), estimate_training_memory(tied, setup)
        # The head stays fp32 even in a 4-bit model (bitsandbytes leaves lm_head alone).
        assert a.breakdown["weights"] - b.breakdown["weights"] == 1000 * 64 * 4
        assert a.breakdown["load_peak"] > b.breakdown["load_peak"]


@pytest.mark.parametrize("config", [LLAMA_7B, QWEN2_05B, GPT2], ids=["llama", "qwen2", "gpt2"])
def test_estimate_grows_with_the_vocabulary(config: dict) -> None:
    setup = TrainingSetup(num_layers=2, precision="fp32", batch_size=2, seq_len=64)
    totals = [estimate_training_memory({**config, "vocab_size": v}, setup) for v in (32000, 64000, 152000)]
    for small, big in zip(totals, totals[1:]):
        assert big.total_bytes > small.total_bytes
        assert big.breakdown["logits"] > small.breakdown["logits"]
        assert big.breakdown["weights"] > small.breakdown["weights"]


def test_an_untied_mmapped_embedding_counts_only_the_rows_a_dataset_reads() -> None:
    from hardware_profiles.memory import CPU_EMBEDDING_ROWS_TOUCHED, weight_bytes

    untied = {**QWEN2_05B, "num_hidden_layers": 2, "tie_word_embeddings": False}
    shape = model_shape(untied)
    setup = TrainingSetup(precision="fp32", batch_size=1, seq_len=16, checkpoint_precision="fp32")
    full, _ = weight_bytes(shape, 2, "fp32")
    unread = (shape.vocab_size - CPU_EMBEDDING_ROWS_TOUCHED) * shape.hidden_size * 4
    assert estimate_training_memory(untied, setup).breakdown["weights"] == full - unread
    # A tied head reads every row; a converted checkpoint copies every row; CUDA copies too.
    tied = {**untied, "tie_word_embeddings": True}
    assert estimate_training_memory(tied, setup).breakdown["weights"] == weight_bytes(model_shape(tied), 2, "fp32")[0]
    assert estimate_training_memory(untied, replace(setup, precision="bf16")).breakdown["weights"] == weight_bytes(shape, 2, "bf16")[0]
    assert estimate_training_memory(untied, replace(setup, device="cuda")).breakdown["weights"] == full
