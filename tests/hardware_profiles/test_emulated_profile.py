"""A class played on this machine under a memory cap (hardware_profiles.detect.emulated_profile).

The machine is faked through detection (conftest.py: a 32 GB RTX 3060 desktop with 26 GiB
free, or a crowded box), so every number is known; the catalog, budgets, estimator and
assignment are the real code. What is checked: the class's capabilities, a CPU profile of
this machine, memory capped at the limit; the budget the coordinator computes from it
(limit x (1 - class margin)); and the client's own check, where its resident set is inside the
cap rather than added on top of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_client.preflight import preflight
from hardware_profiles.assignment import PublishedPackage, assign_tier, check_plan
from hardware_profiles.budget import budget_for
from hardware_profiles.detect import detect_profile, emulated_profile
from hardware_profiles.planner import PlannerOptions, plan_for_profile
from hardware_profiles.profile import load_catalog
from shared.errors import ConfigError
from shared.layermap import kept_layers
from shared.protocol import Manifest, TrainingParams

from .conftest import GIB, LLAMA_7B, RANKING, FakeMachine

MIB = 1 << 20


def _nf4(tiers: dict[str, list[int]]) -> dict[str, PublishedPackage]:
    """The run's packages: every tier in nf4 only."""
    return {name: PublishedPackage(tuple(kept), "nf4") for name, kept in tiers.items()}


def _params() -> TrainingParams:
    return TrainingParams(local_steps=5, learning_rate=1e-4, batch_size=4, seq_len=128, lora_rank=8, lora_alpha=16.0,
                          lora_dropout=0.0, target_modules=["q_proj", "v_proj"], mu=0.01, seed=0)


def test_a_gpu_class_played_on_this_machine_is_a_cpu_profile_with_the_class_flags_and_capped_memory(rtx3060_box: Path) -> None:
    profile = emulated_profile(2 * GIB, device_class="rtx-3060-12gb", root=rtx3060_box)
    assert profile.device_class == "rtx-3060-12gb"
    # Where it really runs: the CPU (the cap holds host memory only), no GPU fields.
    assert profile.accelerator == "cpu" and not profile.unified_memory and not profile.is_jetson
    assert (profile.gpu_name, profile.gpu_total_memory_bytes, profile.gpu_free_memory_bytes, profile.compute_capability) == ("", 0, 0, "")
    assert profile.cpu_count == 16  # this machine's
    assert profile.available_memory_bytes == profile.total_memory_bytes == 2 * GIB  # 26 GiB free, capped
    assert profile.supports_4bit == detect_profile(root=rtx3060_box).supports_4bit  # the class allows it; bitsandbytes decides
    budget = budget_for(profile)
    cls = load_catalog().get("rtx-3060-12gb")
    assert budget.bytes == int(2 * GIB * (1 - cls.safety_margin))  # the class's 10% margin, on the cap
    assert budget.device == "cpu" and budget.supports_bf16 and "2.00 GiB available memory less 10% margin" in budget.source


def test_a_jetson_class_keeps_its_no_4bit_flag_and_the_coordinator_refuses_4bit_packages(rtx3060_box: Path) -> None:
    profile = emulated_profile(int(1.5 * GIB), device_class="jetson-orin-nano-8gb", root=rtx3060_box)
    assert profile.device_class == "jetson-orin-nano-8gb" and not profile.supports_4bit
    assert profile.accelerator == "cpu" and not profile.unified_memory
    assert budget_for(profile).bytes == int(1.5 * GIB * 0.85)
    refused = assign_tier("nano", profile, LLAMA_7B, _nf4({"L32": list(range(32))}), _params())
    assert not refused.accepted and "none runs on jetson-orin-nano-8gb" in refused.reason and "pruning.extra_precisions" in refused.reason


def test_the_cap_changes_the_tier_the_coordinator_assigns(rtx3060_box: Path) -> None:
    tiers = {"L32": list(range(32)), "L16": kept_layers(32, RANKING, 16), "L8": kept_layers(32, RANKING, 24)}
    relabelled = detect_profile(override="cpu-8gb", root=rtx3060_box)  # --profile alone: the machine's 26 GiB
    capped = emulated_profile(6 * GIB, device_class="cpu-8gb", root=rtx3060_box)
    roomy = assign_tier("a", relabelled, LLAMA_7B, _nf4(tiers), _params())
    tight = assign_tier("b", capped, LLAMA_7B, _nf4(tiers), _params())
    assert roomy.accepted and tight.accepted
    assert (roomy.tier, tight.tier) == ("L32", "L8")
    assert tight.plan["budget_bytes"] == int(6 * GIB * 0.85) >= tight.plan["estimate_bytes"]
    starved = assign_tier("c", emulated_profile(2 * GIB, device_class="cpu-8gb", root=rtx3060_box),
                          LLAMA_7B, _nf4(tiers), _params())
    assert not starved.accepted and "no prepared tier fits" in starved.reason


def test_the_clients_own_check_keeps_its_resident_set_inside_the_cap(rtx3060_box: Path) -> None:
    limit = 6 * GIB
    profile = emulated_profile(limit, device_class="cpu-8gb", root=rtx3060_box)
    plan = assign_tier("b", profile, LLAMA_7B, _nf4({"L8": kept_layers(32, RANKING, 24)}), _params()).plan
    rss = 700 * MIB
    capped = check_plan(LLAMA_7B, plan, profile, process_rss_bytes=rss, memory_limit_bytes=limit)
    assert capped.budget_bytes == int(limit * 0.85)  # min(available + rss, limit), less the margin
    # Without the cap the resident set would be counted on top of a cap it is inside of.
    assert check_plan(LLAMA_7B, plan, profile, process_rss_bytes=rss).budget_bytes == int((limit + rss) * 0.85)
    assert budget_for(profile, process_rss_bytes=rss, memory_limit_bytes=limit).source.endswith("6.00 GiB memory cap less 15% margin")


def test_on_a_crowded_machine_the_free_memory_counts_with_the_resident_set_up_to_the_cap(fake_machine, tmp_path: Path) -> None:
    fake_machine(FakeMachine(total=16 * GIB, available=1 * GIB, cpus=4))
    limit = 2 * GIB
    profile = emulated_profile(limit, device_class="cpu-8gb", root=tmp_path)
    assert profile.available_memory_bytes == 1 * GIB and profile.total_memory_bytes == limit
    assert budget_for(profile, process_rss_bytes=512 * MIB, memory_limit_bytes=limit).bytes == int(1.5 * GIB * 0.85)
    assert budget_for(profile, process_rss_bytes=1536 * MIB, memory_limit_bytes=limit).bytes == int(limit * 0.85)


def test_preflight_checks_against_the_same_capped_memory(tiny_model_dir, rtx3060_box: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text())
    manifest = Manifest(blob_id="0" * 64, name="m", version=1, tier="L4", chunk_size=4 * MIB, files=[],
                        meta={"layer_map": [0, 1, 2, 3], "model_config": config})
    limit = 2 * GIB
    profile = emulated_profile(limit, device_class="cpu-8gb", root=rtx3060_box)
    plan = plan_for_profile(config, [], profile, options=PlannerOptions(precisions=("fp32",))).to_dict()
    check = preflight(manifest, plan, profile, memory_limit_bytes=limit)  # this process's real resident set
    assert check.fits and check.budget_bytes == int(limit * 0.85)
    tight = 700 * MIB  # above what the estimate's framework term alone needs, below the plan
    refused = preflight(manifest, plan, emulated_profile(tight, device_class="cpu-8gb", root=rtx3060_box), memory_limit_bytes=tight)
    assert not refused.fits and refused.budget_bytes == int(tight * 0.85)
    assert "raise --memory-limit" in refused.reason


def test_without_a_class_the_machine_match_is_played(fake_machine, tmp_path: Path) -> None:
    fake_machine(FakeMachine(total=16 * GIB, available=12 * GIB, cpus=4))
    profile = emulated_profile(GIB, root=tmp_path)
    assert profile.device_class == "cpu-16gb" and profile.available_memory_bytes == GIB


def test_an_unknown_class_is_a_config_error_listing_the_known_ones(rtx3060_box: Path) -> None:
    with pytest.raises(ConfigError, match="unknown device class 'pi-zero'.*cpu-8gb"):
        emulated_profile(GIB, device_class="pi-zero", root=rtx3060_box)
