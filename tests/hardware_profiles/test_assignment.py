"""Assignment: the coordinator's choice among prepared tiers, and the client's preflight re-check.

Devices are faked through detection (see conftest.py); the model config is the Llama-2-7B-shaped
one on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hardware_profiles.assignment import assign_tier, check_plan
from hardware_profiles.detect import detect_profile
from hardware_profiles.planner import plan_for_profile
from shared.errors import ConfigError
from shared.layermap import kept_layers
from shared.protocol import TrainingParams

from .conftest import LLAMA_7B, OPTIONS, RANKING


def _params(**kw) -> TrainingParams:
    values = dict(local_steps=5, learning_rate=1e-4, batch_size=4, seq_len=128, lora_rank=8, lora_alpha=16.0,
                  lora_dropout=0.0, target_modules=["q_proj", "v_proj"], mu=0.01, seed=0)
    values.update(kw)
    return TrainingParams(**values)


def test_assign_tier_gives_the_deepest_prepared_tier_that_fits(rtx3060_box: Path) -> None:
    profile = detect_profile(root=rtx3060_box)
    tiers = {"L32": list(range(32)), "L16": kept_layers(32, RANKING, 16)}
    assignment = assign_tier("c1", profile, LLAMA_7B, tiers, _params(), precision="nf4")
    assert assignment.accepted and assignment.tier == "L32"
    assert assignment.plan["keep_layers"] == list(range(32)) and assignment.plan["precision"] == "nf4"


def test_assign_tier_refuses_4bit_runs_on_a_jetson(orin_nano: Path) -> None:
    profile = detect_profile(root=orin_nano)
    assignment = assign_tier("nano", profile, LLAMA_7B, {"L32": list(range(32))}, _params(), precision="nf4")
    assert not assignment.accepted and assignment.tier == ""
    assert "bitsandbytes" in assignment.reason and "jetson-orin-nano-8gb" in assignment.reason


def test_assign_tier_picks_a_smaller_tier_or_refuses_with_numbers(orin_nano: Path) -> None:
    profile = detect_profile(root=orin_nano)
    small = kept_layers(32, RANKING, 30)
    tiers = {"L32": list(range(32)), f"L{len(small)}": small}
    assignment = assign_tier("nano", profile, LLAMA_7B, tiers, _params(), precision="bf16")
    assert assignment.accepted and assignment.tier == f"L{len(small)}"
    refused = assign_tier("nano", profile, LLAMA_7B, {"L32": list(range(32))}, _params(), precision="bf16")
    assert not refused.accepted and "L32 needs" in refused.reason and "GiB" in refused.reason


def test_check_plan_is_the_clients_preflight(orin_nano: Path, fake_machine, tmp_path: Path) -> None:
    from .conftest import GIB, FakeMachine

    plan = plan_for_profile(LLAMA_7B, RANKING, detect_profile(root=orin_nano), options=OPTIONS).to_dict()
    ok = check_plan(LLAMA_7B, plan, detect_profile(root=orin_nano))
    assert ok.fits and ok.estimate_bytes == plan["estimate_bytes"]
    # Later, something else took most of the memory: the same plan no longer fits.
    fake_machine(FakeMachine(total=int(7.4 * GIB), available=int(1.5 * GIB), cpus=6, gpu_name="Orin",
                             gpu_total=int(7.4 * GIB), gpu_free=int(1.4 * GIB), capability=(8, 7)))
    late = check_plan(LLAMA_7B, plan, detect_profile(root=orin_nano))
    assert not late.fits and "does not fit" in late.reason and "GiB" in late.reason
    with pytest.raises(ConfigError, match="incomplete"):
        check_plan(LLAMA_7B, {"precision": "bf16"}, detect_profile(root=orin_nano))
