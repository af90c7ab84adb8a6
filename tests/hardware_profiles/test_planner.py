"""The planner: tiers for a Jetson Orin Nano and an RTX 3060, nesting, and 'does not fit'.

The two devices are faked through detection (psutil / torch.cuda / Jetson files monkeypatched,
see conftest.py) or taken from the catalog; the model configs are real (a Llama-2-7B-shaped
config on the meta device, and the cut SmolLM2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hardware_profiles.budget import Budget
from hardware_profiles.detect import detect_profile
from hardware_profiles.planner import PlannerOptions, plan_for_profile, plan_tiers
from hardware_profiles.profile import load_catalog
from shared import codec
from shared.errors import ConfigError, InsufficientMemoryError
from shared.layermap import kept_layers
from shared.protocol import Assignment, MessageType

from .conftest import LLAMA_7B, OPTIONS, RANKING


def test_orin_nano_trains_a_deeply_pruned_bf16_tier_and_rtx_3060_the_whole_model_in_nf4() -> None:
    catalog = load_catalog()
    nano = plan_for_profile(LLAMA_7B, RANKING, catalog.get("jetson-orin-nano-8gb"), options=OPTIONS)
    rtx = plan_for_profile(LLAMA_7B, RANKING, catalog.get("rtx-3060-12gb"), options=OPTIONS)
    # No bitsandbytes 4-bit on the Orin's sm_87: bf16 weights, so most layers must go.
    assert nano.precision == "bf16" and 1 <= len(nano.keep_layers) <= 8
    assert rtx.precision == "nf4" and len(rtx.keep_layers) == 32 and rtx.pruned_blocks == 0
    for plan in (nano, rtx):
        assert plan.estimate_bytes <= plan.budget_bytes
        assert plan.tier == f"L{len(plan.keep_layers)}"
        assert list(plan.keep_layers) == kept_layers(32, RANKING, plan.pruned_blocks)
    assert set(nano.keep_layers) <= set(rtx.keep_layers)


def test_the_plan_keeps_the_most_layers_that_fit() -> None:
    nano = load_catalog().get("jetson-orin-nano-8gb")
    plan = plan_for_profile(LLAMA_7B, RANKING, nano, options=OPTIONS)
    # One block fewer pruned does not fit with any allowed setting.
    deeper = PlannerOptions(**{**OPTIONS.__dict__, "max_blocks": plan.pruned_blocks - 1})
    with pytest.raises(InsufficientMemoryError):
        plan_for_profile(LLAMA_7B, RANKING, nano, options=deeper)


def test_plans_of_all_catalog_classes_are_nested_tiers() -> None:
    plans = plan_tiers(LLAMA_7B, RANKING, list(load_catalog()), options=OPTIONS)
    kept = sorted((set(p.keep_layers) for p in plans.values() if not isinstance(p, str)), key=len)
    assert len(kept) >= 3
    for small, big in zip(kept, kept[1:]):
        assert small <= big


def test_small_budget_turns_on_checkpointing_then_smaller_batches() -> None:
    budget = Budget(bytes=int(7.2 * 2**30), device="cuda", unified_memory=False, supports_4bit=True,
                    supports_bf16=True, sustained_tflops=10.0, source="test card")
    plan = plan_for_profile(LLAMA_7B, RANKING, budget, options=OPTIONS)
    assert plan.grad_checkpointing
    assert plan.batch_size * plan.grad_accumulation >= OPTIONS.batch_size
    assert plan.step_seconds and plan.step_seconds > 0


def test_nothing_fits_raises_with_the_numbers(fake_machine, tmp_path: Path) -> None:
    from .conftest import GIB, FakeMachine

    fake_machine(FakeMachine(total=8 * GIB, available=int(0.5 * GIB), cpus=4))
    profile = detect_profile(root=tmp_path)
    with pytest.raises(InsufficientMemoryError) as err:
        plan_for_profile(LLAMA_7B, RANKING, profile, options=OPTIONS)
    message = str(err.value)
    assert "budget" in message and "needs" in message and "GiB" in message
    assert "2 of 32 layers" in message  # the leanest plan tried prunes the whole ranking (30 blocks)
    assert err.value.exit_code == 7


def test_no_runnable_precision_is_a_config_error() -> None:
    nano = load_catalog().get("jetson-orin-nano-8gb")
    with pytest.raises(ConfigError, match="none of the precisions"):
        plan_for_profile(LLAMA_7B, RANKING, nano, options=PlannerOptions(precisions=("nf4",)))


@pytest.mark.parametrize(
    ("ranking", "message"),
    [([[3], [3]], "two ranking blocks"), ([[40]], "outside"), ([[]], "empty"), ([[i] for i in range(32)], "every layer")],
)
def test_malformed_rankings_are_refused(ranking, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        plan_for_profile(LLAMA_7B, ranking, load_catalog().get("rtx-4090-24gb"), options=OPTIONS)


def test_plan_to_dict_travels_in_an_assignment() -> None:
    plan = plan_for_profile(LLAMA_7B, RANKING, load_catalog().get("rtx-4060-8gb"), options=OPTIONS)
    plain = plan.to_dict()
    assert json.loads(json.dumps(plain)) == plain
    for key in ("keep_layers", "precision", "lora_rank", "batch_size", "seq_len", "grad_checkpointing", "estimate_bytes", "budget_bytes"):
        assert key in plain
    message = Assignment(client_id="c1", accepted=True, tier=plan.tier, reason="fits", plan=plain)
    data = codec.encode(MessageType.ASSIGNMENT, message, run="r", round=-1, sender="coordinator")
    assert codec.decode(data).body.plan == plain


def test_small_real_model_on_this_cpu(tiny_model_dir: Path) -> None:
    profile = detect_profile()
    plan = plan_for_profile(tiny_model_dir, [[2], [1]], profile, options=PlannerOptions(batch_size=2, seq_len=32))
    assert plan.pruned_blocks == 0 and plan.keep_layers == (0, 1, 2, 3)
