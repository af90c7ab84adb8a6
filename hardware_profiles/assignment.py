"""Assignment: the coordinator's answer to one client, and the client's re-check before download.

The run's tiers are already prepared (packages in one precision) when a client says hello, so
:func:`assign_tier` does not search a ranking like :func:`~hardware_profiles.planner.plan_for_profile`:
it picks the deepest prepared tier whose plan fits the client's reported profile. Later the
client re-measures and :func:`check_plan` re-estimates that same plan against the memory free
now (:mod:`edge_client.preflight`), refusing with both numbers when it no longer fits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from hardware_profiles.budget import (
    Budget,
    allowed_precisions,
    budget_for,
    runnable_precisions,
)
from hardware_profiles.memory import (
    MemoryEstimate,
    describe_bytes,
    estimate_training_memory,
)
from hardware_profiles.planner import PlannerOptions, fit_tier
from hardware_profiles.profile import Catalog, DeviceClass
from hardware_profiles.shape import model_shape
from hardware_profiles.training_setup import Precision, TrainingSetup
from shared.errors import ConfigError
from shared.protocol import Assignment, DeviceProfile, TrainingParams


@dataclass(frozen=True)
class PublishedPackage:
    """One package a run publishes: a tier's layer map in one weight precision.

    Attributes:
        kept: Full-LLM indices of the layers it keeps.
        precision: Its weight precision (``nf4``, ``bf16``, ``fp32``).
    """

    kept: tuple[int, ...]
    precision: Precision


def assign_tier(
    client_id: str,
    profile: DeviceProfile,
    model_config: Any,
    packages: Mapping[str, PublishedPackage],
    training: TrainingParams,
    *,
    catalog: Catalog | None = None,
) -> Assignment:
    """The coordinator's answer to a Hello: the deepest published package the client can train.

    The run's packages are fixed (a tier may be published in several precisions) and the
    batch is the schedule's, so only gradient checkpointing may give way here. Deeper tiers
    come first; within one depth, packages in precisions the device runs, in the order the
    device prefers them (:func:`~hardware_profiles.budget.allowed_precisions`) and then the
    run's listing.

    Args:
        client_id: The client.
        profile: Its measured profile (from its Hello).
        model_config: The full model's config.
        packages: Published name -> package.
        training: The run's training parameters.
        catalog: Catalog for the profile's class.

    Returns:
        An accepted Assignment with the plan, or a refused one whose reason has the numbers.
    """
    if not packages:
        return _refused(client_id, "the run has no prepared tier")
    budget = budget_for(profile, catalog)
    published = sorted({p.precision for p in packages.values()})
    runnable = _runnable(budget, published)
    if not runnable:
        return _refused(
            client_id,
            f"the run publishes {', '.join(published)} packages but none runs on {profile.device_class} "
            f"({profile.gpu_name or profile.accelerator}: bitsandbytes 4/8-bit {'runs' if budget.supports_4bit else 'does not run'}, "
            f"bf16 {'native' if budget.supports_bf16 else 'not native'}); add a precision it runs to "
            "pruning.extra_precisions (for example \"bf16\")",
        )
    shape = model_shape(model_config)
    preference: dict[str, int] = {}
    for precision in [*allowed_precisions(budget), *runnable]:
        preference.setdefault(precision, len(preference))
    candidates = sorted(
        ((name, pkg) for name, pkg in packages.items() if pkg.precision in runnable),
        key=lambda item: (-len(item[1].kept), preference[item[1].precision], item[0]),
    )
    leanest: tuple[str, MemoryEstimate] | None = None
    for name, pkg in candidates:
        keep_t = tuple(sorted(int(i) for i in pkg.kept))
        options = PlannerOptions.from_training(training, precisions=(pkg.precision,))
        plan, est = fit_tier(shape, keep_t, -1, budget, options, [pkg.precision])
        if plan is not None:
            plan = replace(plan, tier=name, pruned_blocks=shape.num_layers - len(keep_t))
            return Assignment(
                client_id=client_id,
                accepted=True,
                tier=name,
                reason=f"{name} fits: {describe_bytes(plan.estimate_bytes)} of {describe_bytes(plan.budget_bytes)} ({budget.source})",
                plan=plan.to_dict(),
            )
        if leanest is None or est.total_bytes < leanest[1].total_bytes:
            leanest = (name, est)
    assert leanest is not None
    name, est = leanest
    return _refused(
        client_id,
        f"no prepared tier fits {budget.source}: budget {describe_bytes(budget.bytes)}, the smallest tier {name} "
        f"needs {describe_bytes(est.total_bytes)} even with gradient checkpointing",
    )


def _runnable(budget: Budget, precisions: Sequence[Precision]) -> list[Precision]:
    """Those of ``precisions`` that run on the device (empty when none does)."""
    try:
        return runnable_precisions(budget, precisions)
    except ConfigError:
        return []


def _refused(client_id: str, reason: str) -> Assignment:
    return Assignment(client_id=client_id, accepted=False, tier="", reason=reason, plan={})


@dataclass(frozen=True)
class MemoryCheck:
    """Whether an assigned plan fits the memory a client really has now.

    Attributes:
        fits: The estimate is within the budget.
        estimate_bytes: Estimated peak of the plan.
        budget_bytes: What the device offers now.
        reason: One line with both numbers.
    """

    fits: bool
    estimate_bytes: int
    budget_bytes: int
    reason: str


def check_plan(
    model_config: Any,
    plan: Mapping[str, Any],
    profile: DeviceProfile | DeviceClass | Budget,
    *,
    catalog: Catalog | None = None,
    process_rss_bytes: int = 0,
    memory_limit_bytes: int | None = None,
) -> MemoryCheck:
    """Re-estimate an assigned plan against the memory free now (the client's preflight).

    Args:
        model_config: The FULL model's config (the plan's ``keep_layers`` cut it).
        plan: :meth:`~hardware_profiles.planner.Plan.to_dict` output (``Assignment.plan``).
        profile: The client's freshly measured profile (or a class / budget).
        catalog: Catalog for the profile's class.
        process_rss_bytes: The calling process's resident set (see
            :func:`~hardware_profiles.budget.budget_for`).
        memory_limit_bytes: The calling process's memory cap, if it runs under one (see
            :func:`~hardware_profiles.budget.budget_for`).

    Returns:
        The :class:`MemoryCheck`.

    Raises:
        ConfigError: The plan lacks a field or holds an invalid value.
    """
    try:
        setup_fields = {
            "num_layers": len(plan["keep_layers"]),
            "precision": plan["precision"],
            "lora_rank": int(plan["lora_rank"]),
            "lora_targets": tuple(plan.get("lora_targets", ("q_proj", "v_proj"))),
            "lora_dropout": float(plan.get("lora_dropout", 0.0)),
            "batch_size": int(plan["batch_size"]),
            "seq_len": int(plan["seq_len"]),
            "grad_checkpointing": bool(plan["grad_checkpointing"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"the assigned plan is incomplete or malformed ({exc!r}): {dict(plan)}") from None
    budget = profile if isinstance(profile, Budget) else budget_for(
        profile, catalog, process_rss_bytes=process_rss_bytes, memory_limit_bytes=memory_limit_bytes
    )
    setup = TrainingSetup(**setup_fields, device=budget.device, unified_memory=budget.unified_memory)
    est = estimate_training_memory(model_config, setup)
    fits = est.total_bytes <= budget.bytes
    verdict = "fits" if fits else "does not fit"
    return MemoryCheck(
        fits=fits,
        estimate_bytes=est.total_bytes,
        budget_bytes=budget.bytes,
        reason=f"{plan.get('tier', 'the plan')} {verdict}: needs {describe_bytes(est.total_bytes)}, {budget.source} gives {describe_bytes(budget.bytes)}",
    )
