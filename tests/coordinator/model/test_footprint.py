"""The coordinator memory estimate: every term scales as the workload says.

Every model here is a config dict read on the meta device: nothing is allocated or trained.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.reference_configs import QWEN2_05B
from coordinator.model.footprint import (
    COORDINATOR_CPU_FRAMEWORK_BYTES,
    KL_CHUNK_TENSORS,
    NLL_CHUNK_TENSORS,
    PHASES,
    CoordinatorWorkload,
    estimate_coordinator_memory,
)
from hardware_profiles.memory import CUDA_CONTEXT_BYTES
from hardware_profiles.shape import model_shape
from shared.errors import ConfigError
from tests.coordinator.model.footprint_cases import LLAMA, estimate, workload


def test_total_is_the_largest_phase_and_phases_add_their_terms():
    est = estimate()
    assert set(est.phases) == set(PHASES)
    assert est.total == max(est.phases.values()) == est.phases[est.peak_phase]
    for phase, names in est.phase_terms.items():
        assert est.phases[phase] == sum(est.breakdown[name] for name in names)
        assert {"framework", "full_model"} <= set(names)  # every phase sits on top of the full model
    assert est.breakdown["framework"] == COORDINATOR_CPU_FRAMEWORK_BYTES


def test_full_model_counts_tied_embeddings_once_and_bf16_halves_it():
    shape = model_shape(LLAMA)
    fp32 = estimate(dtype="fp32")
    bf16 = estimate(dtype="bf16")
    assert fp32.breakdown["full_model"] == shape.total_params() * 4
    assert shape.lm_head_params == 0  # tied: the head is the embedding
    assert bf16.breakdown["full_model"] * 2 == fp32.breakdown["full_model"]
    assert bf16.breakdown["student"] * 2 == fp32.breakdown["student"]
    assert bf16.total < fp32.total


def test_non_fp32_trains_fp32_master_weights_of_trainable_params_only():
    fp32 = estimate(dtype="fp32")
    bf16 = estimate(dtype="bf16")
    shape = model_shape(LLAMA)
    trainable = fp32.breakdown["trainable_state"] // 12  # fp32: grad 4 + AdamW 8 bytes per parameter
    assert trainable % (shape.layer_linear_params + shape.layer_other_params) == 0
    assert bf16.breakdown["trainable_state"] == trainable * (2 + 8 + 8)  # grad bf16, AdamW, master + its grad


def test_bridge_alignment_trains_less_than_all_layers():
    bridge = estimate(align_layers="bridge")
    every = estimate(align_layers="all")
    assert bridge.breakdown["trainable_state"] < every.breakdown["trainable_state"]
    assert bridge.phases["oda"] < every.phases["oda"]


def test_a_deeper_tier_has_a_larger_student():
    shallow = estimate(depths=(4,))
    deep = estimate(depths=(6,))
    assert shallow.breakdown["student"] < deep.breakdown["student"] < shallow.breakdown["full_model"]
    both = estimate(depths=(4, 6))
    assert both.breakdown["package_student"] == deep.breakdown["package_student"]  # the deepest tier is packaged last


def test_larger_batch_or_sequence_grows_the_working_set():
    small = estimate(calibration_batch_size=2, seq_len=64)
    for bigger in (estimate(calibration_batch_size=8, seq_len=64), estimate(calibration_batch_size=2, seq_len=256)):
        assert bigger.breakdown["sgp_hidden_states"] > small.breakdown["sgp_hidden_states"]
        assert bigger.breakdown["oda_activations"] > small.breakdown["oda_activations"]
        assert bigger.breakdown["eval_activations"] > small.breakdown["eval_activations"]
        assert bigger.total > small.total


def test_kl_chunk_stops_growing_once_the_tokens_exceed_the_chunk():
    v = LLAMA["vocab_size"]
    short = estimate(calibration_batch_size=4, seq_len=512, kl_chunk_tokens=1024)  # 2048 tokens
    long = estimate(calibration_batch_size=4, seq_len=2048, kl_chunk_tokens=1024)  # 8192 tokens
    assert short.breakdown["kl_chunk"] == long.breakdown["kl_chunk"] == KL_CHUNK_TENSORS * 1024 * v * 4
    tiny = estimate(calibration_batch_size=1, seq_len=128, kl_chunk_tokens=1024)  # fewer tokens than a chunk
    assert tiny.breakdown["kl_chunk"] == KL_CHUNK_TENSORS * 128 * v * 4
    assert estimate(seq_len=512, kl_chunk_tokens=256).breakdown["kl_chunk"] < short.breakdown["kl_chunk"]


def test_qwen2_estimate_has_no_tokens_by_vocab_term_beyond_the_chunk():
    chunk = 512
    w = CoordinatorWorkload(depths=(18,), block_size=2, calibration_batch_size=8, seq_len=1024, kl_chunk_tokens=chunk)
    v = QWEN2_05B["vocab_size"]
    est = estimate_coordinator_memory(QWEN2_05B, w)
    assert est.breakdown["kl_chunk"] == KL_CHUNK_TENSORS * chunk * v * 4
    assert est.breakdown["eval_nll_chunk"] == NLL_CHUNK_TENSORS * chunk * v * 4
    # What the vocabulary adds to the working set (weights aside) is the same at 8k and 16k
    # tokens: only the chunks scale with V, never the tokens times V.
    weights = ("full_model", "student", "package_student", "package_staging", "package_model", "eval_student")
    wider = {**QWEN2_05B, "vocab_size": 2 * v}

    def vocab_part(seq_len: int) -> int:
        a = estimate_coordinator_memory(QWEN2_05B, replace(w, seq_len=seq_len)).breakdown
        b = estimate_coordinator_memory(wider, replace(w, seq_len=seq_len)).breakdown
        return sum(b[k] - a[k] for k in a if k not in weights)

    assert vocab_part(1024) == vocab_part(2048) == (KL_CHUNK_TENSORS + NLL_CHUNK_TENSORS) * chunk * v * 4


def test_gradient_checkpointing_keeps_less_than_every_layer():
    on = estimate(gradient_checkpointing=True, align_layers="all")
    off = estimate(gradient_checkpointing=False, align_layers="all")
    assert on.breakdown["oda_activations"] < off.breakdown["oda_activations"]


def test_the_uniform_drop_baseline_can_set_the_oda_peak():
    # 16 layers -> 12: SGP removes two blocks of 2 (at most two bridges); uniform drop spreads
    # four single gaps, so its student trains more layers.
    deep = {**LLAMA, "num_hidden_layers": 16}
    alone = estimate(deep, depths=(12,))
    with_baseline = estimate(deep, depths=(12,), baseline_student=True)
    assert with_baseline.breakdown["trainable_state"] > alone.breakdown["trainable_state"]


def test_no_distillation_means_no_oda_phase():
    est = estimate(oda_steps=0)
    assert est.phases["oda"] == 0
    assert est.peak_phase != "oda"


def test_cuda_counts_device_memory_only():
    cpu = estimate(dtype="bf16", device="cpu")
    gpu = estimate(dtype="bf16", device="cuda")
    assert gpu.breakdown["framework"] == CUDA_CONTEXT_BYTES
    assert gpu.breakdown["package_model"] == 0  # packages are quantized on the host
    assert all(gpu.breakdown[f"allocator_{p}"] > 0 for p in PHASES)
    assert "allocator_oda" not in cpu.breakdown


def test_a_checkpoint_in_another_dtype_costs_its_pages_while_loading():
    same = estimate(dtype="bf16", checkpoint_dtype="bf16")
    converted = estimate(dtype="bf16", checkpoint_dtype="fp32")
    assert same.breakdown["load_conversion"] == 0
    assert converted.breakdown["load_conversion"] == 2 * converted.breakdown["full_model"]


def test_describe_names_the_peak_and_its_parts():
    est = estimate()
    line = est.describe()
    assert line.startswith("the coordinator needs about ")
    assert "full model" in line and "fp32" in line
    if est.peak_phase == "oda":
        assert f"tier L{est.peak_tier} student" in line and "ODA working set" in line
    assert est.to_dict()["total"] == est.total


def test_bad_workloads_are_refused():
    with pytest.raises(ConfigError, match="dtype"):
        workload(dtype="fp8")
    with pytest.raises(ConfigError, match="depths"):
        CoordinatorWorkload(depths=())
    with pytest.raises(ConfigError, match="block size"):
        estimate(depths=(5,), block_size=2)  # 8 - 5 layers is not a whole number of blocks
    with pytest.raises(ConfigError, match="12 layers"):
        estimate(num_layers=12)
