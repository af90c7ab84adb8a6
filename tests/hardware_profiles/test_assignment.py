"""Assignment: the coordinator's choice among prepared tiers, and the client's preflight re-check.

Devices are faked through detection (see conftest.py); the model config is the Llama-2-7B-shaped
one on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from hardware_profiles.assignment import PublishedPackage, assign_tier, check_plan
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


def _packages(tiers: dict[str, list[int]], precision: str) -> dict[str, PublishedPackage]:
    return {name: PublishedPackage(tuple(kept), precision) for name, kept in tiers.items()}  # type: ignore[arg-type]


def test_assign_tier_gives_the_deepest_prepared_tier_that_fits(rtx3060_box: Path) -> None:
    profile = detect_profile(root=rtx3060_box)
    tiers = {"L32": list(range(32)), "L16": kept_layers(32, RANKING, 16)}
    assignment = assign_tier("c1", profile, LLAMA_7B, _packages(tiers, "nf4"), _params())
    assert assignment.accepted and assignment.tier == "L32"
    assert assignment.plan["keep_layers"] == list(range(32)) and assignment.plan["precision"] == "nf4"


def test_assign_tier_refuses_4bit_runs_on_a_jetson(orin_nano: Path) -> None:
    profile = detect_profile(root=orin_nano)
    assignment = assign_tier("nano", profile, LLAMA_7B, _packages({"L32": list(range(32))}, "nf4"), _params())
    assert not assignment.accepted and assignment.tier == ""
    assert "bitsandbytes" in assignment.reason and "jetson-orin-nano-8gb" in assignment.reason
    assert "pruning.extra_precisions" in assignment.reason


def _two_precisions() -> dict[str, PublishedPackage]:
    small = tuple(kept_layers(32, RANKING, 30))  # prunes 30 of 32: small enough for the Orin Nano in bf16
    name = f"L{len(small)}"
    return {name: PublishedPackage(small, "nf4"), f"{name}-bf16": PublishedPackage(small, "bf16")}


def test_a_device_without_4bit_gets_the_tiers_package_in_a_precision_it_runs(orin_nano: Path) -> None:
    nano = assign_tier("nano", detect_profile(root=orin_nano), LLAMA_7B, _two_precisions(), _params())
    assert nano.accepted and nano.tier.endswith("-bf16") and nano.plan["precision"] == "bf16"


def test_a_device_with_4bit_gets_the_4bit_package_of_the_same_tier(rtx3060_box: Path) -> None:
    rtx = assign_tier("rtx", detect_profile(root=rtx3060_box), LLAMA_7B, _two_precisions(), _params())
    assert rtx.accepted and "-" not in rtx.tier and rtx.plan["precision"] == "nf4"


def test_assign_tier_picks_a_smaller_tier_or_refuses_with_numbers(orin_nano: Path) -> None:
    profile = detect_profile(root=orin_nano)
    small = kept_layers(32, RANKING, 30)
    tiers = {"L32": list(range(32)), f"L{len(small)}": small}
    assignment = assign_tier("nano", profile, LLAMA_7B, _packages(tiers, "bf16"), _params())
    assert assignment.accepted and assignment.tier == f"L{len(small)}"
    refused = assign_tier("nano", profile, LLAMA_7B, _packages({"L32": list(range(32))}, "bf16"), _params())
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
