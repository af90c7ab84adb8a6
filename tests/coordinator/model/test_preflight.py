"""check_fits and preflight: a workload that cannot fit is refused, saying what would.

Every model here is a config dict read on the meta device: nothing is allocated or trained.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from benchmarks.reference_configs import QWEN2_05B
from coordinator.model.footprint import CoordinatorWorkload, estimate_coordinator_memory
from coordinator.model.preflight import available_memory, check_fits, preflight
from shared.errors import ConfigError, InsufficientMemoryError
from tests.coordinator.model.footprint_cases import LLAMA, estimate, workload


def test_check_fits_passes_when_there_is_enough():
    est = estimate()
    check_fits(est, est.total)
    check_fits(est, est.total + 1 << 30)


def test_check_fits_names_the_shortfall_and_a_smaller_batch_that_fits():
    est = estimate(calibration_batch_size=8, seq_len=512)
    by_batch = {b: estimate(calibration_batch_size=b, seq_len=512).total for b in (4, 2)}
    assert by_batch[2] < by_batch[4] < est.total
    available = (by_batch[2] + by_batch[4]) // 2  # batch 2 fits, batch 4 does not
    with pytest.raises(InsufficientMemoryError) as info:
        check_fits(est, available, what="RAM")
    message = str(info.value)
    assert "of RAM is available" in message and "short by" in message
    assert "calibration batch size 2 would need" in message
    assert "calibration batch size 4" not in message  # it does not fit
    assert "a GPU with about" in message and "free (bf16)" in message


def test_check_fits_suggests_smaller_kl_chunks_when_the_vocabulary_dominates():
    est = estimate_coordinator_memory(QWEN2_05B, CoordinatorWorkload(depths=(18,), block_size=2, calibration_batch_size=4, seq_len=512, kl_chunk_tokens=1024))
    smaller = estimate_coordinator_memory(QWEN2_05B, replace(est.workload, kl_chunk_tokens=512))
    assert smaller.total < est.total
    with pytest.raises(InsufficientMemoryError, match=r"KL / NLL chunks of 512 tokens \(prune --chunk-tokens 512, or alignment.chunk_tokens = 512 in the run config\) would need"):
        check_fits(est, smaller.total)


def test_check_fits_on_cuda_offers_cpu_offload():
    est = estimate(dtype="bf16", device="cuda")
    with pytest.raises(InsufficientMemoryError, match="CPU offload"):
        check_fits(est, est.breakdown["full_model"] // 2, what="GPU memory")


def test_check_fits_says_when_nothing_smaller_fits():
    est = estimate()
    with pytest.raises(InsufficientMemoryError, match="alone need"):
        check_fits(est, est.breakdown["framework"], what="RAM")


def test_available_memory():
    assert available_memory("cpu") > 0
    with pytest.raises(ConfigError, match="unknown device"):
        available_memory("tpu")


def test_preflight_says_the_estimate_and_what_is_available():
    lines: list[str] = []
    est = preflight(LLAMA, workload(), say=lines.append)
    assert est.total == estimate().total
    assert len(lines) == 1 and lines[0].startswith("the coordinator needs about") and "available" in lines[0]


def test_preflight_refuses_what_this_machine_cannot_hold():
    # Qwen2-0.5B's vocabulary at 64 x 4096 calibration tokens is far beyond any test machine.
    huge = CoordinatorWorkload(depths=(18,), block_size=2, calibration_batch_size=64, seq_len=4096)
    assert estimate_coordinator_memory(QWEN2_05B, huge).total > available_memory("cpu")
    with pytest.raises(InsufficientMemoryError, match="of RAM is available"):
        preflight(QWEN2_05B, huge)


def test_the_chunk_setting_the_refusal_names_exists_everywhere_it_says():
    from coordinator.model.lm_head import DEFAULT_CHUNK_TOKENS
    from coordinator.model.pipeline import oda_config, run_workload
    from coordinator.model.placement import Placement
    from coordinator.settings import AlignmentSettings, RunConfig

    assert AlignmentSettings().chunk_tokens == DEFAULT_CHUNK_TOKENS
    assert CoordinatorWorkload(depths=(6,)).kl_chunk_tokens == DEFAULT_CHUNK_TOKENS
    alignment = AlignmentSettings(chunk_tokens=64)
    assert oda_config(alignment, 3, "bridge", 0).kl_chunk_tokens == 64
    config = RunConfig(alignment=alignment)
    assert run_workload(config, 30, Placement("cpu", "fp32")).kl_chunk_tokens == 64
    with pytest.raises(ConfigError, match="chunk_tokens"):
        AlignmentSettings(chunk_tokens=0)
