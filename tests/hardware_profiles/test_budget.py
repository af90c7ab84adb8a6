"""Budgets of measured profiles: a Jetson's available unified memory, an RTX card's free GPU memory.

The two devices are faked through detection (psutil / torch.cuda / Jetson files monkeypatched,
see conftest.py); each is then planned for, and the plan stays inside its budget.
"""

from __future__ import annotations

from pathlib import Path

from hardware_profiles.budget import budget_for
from hardware_profiles.detect import detect_profile
from hardware_profiles.planner import plan_for_profile

from .conftest import LLAMA_7B, OPTIONS, RANKING


def test_measured_jetson_orin_nano_profile(orin_nano: Path) -> None:
    profile = detect_profile(root=orin_nano)
    budget = budget_for(profile)
    # Unified memory: what is available now, less the class's 15% margin.
    assert budget.unified_memory and budget.device == "cuda" and not budget.supports_4bit
    assert budget.bytes == int(profile.available_memory_bytes * 0.85)
    plan = plan_for_profile(LLAMA_7B, RANKING, profile, options=OPTIONS)
    assert plan.precision == "bf16" and plan.estimate_bytes <= budget.bytes


def test_measured_rtx_3060_profile_uses_free_gpu_memory(rtx3060_box: Path) -> None:
    profile = detect_profile(root=rtx3060_box)
    budget = budget_for(profile)
    assert budget.bytes == int(profile.gpu_free_memory_bytes * 0.9) and budget.supports_4bit
    plan = plan_for_profile(LLAMA_7B, RANKING, profile, options=OPTIONS)
    assert plan.precision == "nf4" and len(plan.keep_layers) == 32
