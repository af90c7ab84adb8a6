"""The tier planner: the deepest sub-LLM a device can really train, decided before any download.

Input: the full model's config, the SGP ranking (blocks of full-LLM layer indices in pruning
order, from :func:`coordinator.model.sgp.rank_blocks`) and a device (a catalog
:class:`~hardware_profiles.profile.DeviceClass` or a measured
:class:`~shared.protocol.DeviceProfile`). Pruning the first ``k`` blocks gives tier ``k``; the
planner tries ``k = 0, 1, 2, ...`` and, for each, the allowed precisions in order of
preference and then cheaper settings (gradient checkpointing, smaller batches), and returns
the first plan whose :func:`~hardware_profiles.memory.estimate_training_memory` fits the
device's budget. Because every plan prunes a prefix of one ranking, the plans of any two
devices are nested: the smaller device's kept layers are a subset of the larger one's.

Nothing fits: :class:`~shared.errors.InsufficientMemoryError` with the smallest estimate and
the budget in the message.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from hardware_profiles.flops import training_flops
from hardware_profiles.memory import (
    MemoryEstimate,
    describe_bytes,
    estimate_training_memory,
)
from hardware_profiles.profile import Catalog, DeviceClass, load_catalog
from hardware_profiles.shape import ModelShape, model_shape
from hardware_profiles.training_setup import (
    PRECISIONS,
    Optimizer,
    Precision,
    TrainingSetup,
)
from shared.errors import ConfigError, InsufficientMemoryError
from shared.layermap import check_ranking, kept_layers, tier_name
from shared.protocol import Assignment, DeviceProfile, TrainingParams

log = logging.getLogger(__name__)

DEFAULT_SAFETY_MARGIN = 0.15
"""Margin for a measured profile whose class is unknown."""


@dataclass(frozen=True)
class Budget:
    """What a device offers a training run.

    Attributes:
        bytes: Memory the estimate must fit in (margin already taken off).
        device: ``cpu`` or ``cuda``.
        unified_memory: Host and GPU share the memory (Jetson).
        supports_4bit: bitsandbytes 4-bit runs there.
        supports_bf16: bfloat16 is native there.
        sustained_tflops: Planning throughput, ``None`` when unknown.
        source: Where the numbers come from, for messages.
    """

    bytes: int
    device: Literal["cpu", "cuda"]
    unified_memory: bool
    supports_4bit: bool
    supports_bf16: bool
    sustained_tflops: float | None
    source: str


def budget_for(
    device: DeviceClass | DeviceProfile,
    catalog: Catalog | None = None,
    *,
    process_rss_bytes: int = 0,
) -> Budget:
    """The memory budget of a catalog class (nominal) or a measured profile (now).

    A measured profile offers what is free now: free GPU memory on a discrete card, available
    RAM on a CPU box or a Jetson (whose GPU shares it), less the class's safety margin.

    Args:
        device: A catalog class or a measured profile.
        catalog: Catalog to look the profile's class up in (default: the shipped one).
        process_rss_bytes: Resident set of the calling process, added back to the available
            memory because the estimate already counts the whole process (pass it when a
            client checks its own assignment; 0 on the coordinator).

    Returns:
        The :class:`Budget`.
    """
    if isinstance(device, DeviceClass):
        return Budget(
            bytes=device.budget_bytes(),
            device=device.accelerator,
            unified_memory=device.unified_memory,
            supports_4bit=device.supports_4bit,
            supports_bf16=device.supports_bf16,
            sustained_tflops=device.sustained_tflops,
            source=f"catalog class {device.name}",
        )
    catalog = catalog if catalog is not None else load_catalog()
    cls = catalog.get(device.device_class) if device.device_class in catalog else None
    margin = cls.safety_margin if cls else DEFAULT_SAFETY_MARGIN
    if device.accelerator == "cuda" and not device.unified_memory:
        free = device.gpu_free_memory_bytes or (device.gpu_total_memory_bytes - (cls.reserved_bytes if cls else 0))
        what = "free GPU memory"
    else:
        free = device.available_memory_bytes + process_rss_bytes if device.available_memory_bytes else 0
        what = "available memory"
    if free <= 0 and cls is not None:
        return replace(budget_for(cls), source=f"catalog class {cls.name} ({what} of {device.name} unknown)")
    major = float(device.compute_capability) if device.compute_capability else 0.0
    return Budget(
        bytes=max(int(free * (1 - margin)), 0),
        device=device.accelerator,
        unified_memory=device.unified_memory,
        supports_4bit=device.supports_4bit,
        supports_bf16=cls.supports_bf16 if cls else major >= 8.0,
        sustained_tflops=cls.sustained_tflops if cls else None,
        source=f"{device.name} ({device.device_class}): {describe_bytes(free)} {what} less {margin:.0%} margin",
    )


def allowed_precisions(budget: Budget) -> tuple[Precision, ...]:
    """Precisions a device trains in by default, in order of preference.

    On a GPU: NF4 (QLoRA, the method's default) where bitsandbytes runs, otherwise the
    native half precision. On a CPU: fp32 first (fastest there, and bitsandbytes' CPU path
    dequantizes every weight for every matmul), then NF4 where it runs, else bf16, to fit
    deeper tiers.
    """
    if budget.device == "cuda":
        if budget.supports_4bit:
            return ("nf4",)
        return ("bf16",) if budget.supports_bf16 else ("fp16",)
    return ("fp32", "nf4") if budget.supports_4bit else ("fp32", "bf16")


@dataclass(frozen=True)
class PlannerOptions:
    """What the run asks for and how far the planner may give way.

    Attributes:
        precisions: Precisions to try, in order; ``None``: :func:`allowed_precisions`.
            Precisions the device cannot run are dropped.
        lora_rank: LoRA rank (all clients share it, so the planner never changes it).
        lora_targets: Modules LoRA wraps.
        lora_dropout: LoRA dropout.
        batch_size: Requested sequences per step.
        min_batch_size: Smallest batch the planner may fall back to (the rest by gradient
            accumulation); equal to ``batch_size`` to forbid it.
        seq_len: Tokens per sequence.
        optimizer: Optimizer.
        allow_grad_checkpointing: The planner may switch checkpointing on.
        max_blocks: Prune at most this many ranked blocks (``None``: the whole ranking).
        checkpoint_precision: Precision of the weights the client loads (``None``: a package
            already in the training precision).
    """

    precisions: tuple[Precision, ...] | None = None
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    batch_size: int = 4
    min_batch_size: int = 1
    seq_len: int = 64
    optimizer: Optimizer = "adamw"
    allow_grad_checkpointing: bool = True
    max_blocks: int | None = None
    checkpoint_precision: Precision | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_batch_size <= self.batch_size:
            raise ConfigError(f"min_batch_size must be in 1..batch_size={self.batch_size}, got {self.min_batch_size}")
        if self.precisions is not None and any(p not in PRECISIONS for p in self.precisions):
            raise ConfigError(f"precisions must be among {list(PRECISIONS)}, got {list(self.precisions)}")

    @classmethod
    def from_training(cls, params: TrainingParams, **overrides: Any) -> PlannerOptions:
        """Options from a run's :class:`~shared.protocol.TrainingParams` (batch kept fixed).

        Args:
            params: The run's training parameters.
            **overrides: Any other field.

        Returns:
            The options.
        """
        values: dict[str, Any] = {
            "lora_rank": int(params.lora_rank),
            "lora_targets": tuple(params.target_modules),
            "lora_dropout": float(params.lora_dropout),
            "batch_size": int(params.batch_size),
            "min_batch_size": int(params.batch_size),
            "seq_len": int(params.seq_len),
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    """How one device trains: which tier and with which settings.

    Attributes:
        tier: Tier name, ``L<kept layers>``.
        pruned_blocks: Blocks of the ranking pruned (k). In a plan from :func:`assign_tier`,
            which sees prepared tiers and not the ranking, the number of pruned layers.
        keep_layers: Full-LLM indices of the kept layers, ascending (the layer map).
        precision: Weight precision.
        lora_rank: LoRA rank.
        lora_targets: Modules LoRA wraps.
        lora_dropout: LoRA dropout.
        batch_size: Sequences per step.
        grad_accumulation: Steps accumulated to reach the requested batch.
        seq_len: Tokens per sequence.
        grad_checkpointing: Whether checkpointing is on.
        estimate_bytes: Estimated peak.
        budget_bytes: The device's budget.
        step_seconds: Estimated seconds per optimizer step, ``None`` without a throughput.
        breakdown: The estimate's components (bytes).
    """

    tier: str
    pruned_blocks: int
    keep_layers: tuple[int, ...]
    precision: Precision
    lora_rank: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    batch_size: int
    grad_accumulation: int
    seq_len: int
    grad_checkpointing: bool
    estimate_bytes: int
    budget_bytes: int
    step_seconds: float | None
    breakdown: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """Plain types for :attr:`shared.protocol.Assignment.plan`."""
        return {
            "tier": self.tier,
            "pruned_blocks": self.pruned_blocks,
            "keep_layers": list(self.keep_layers),
            "precision": self.precision,
            "lora_rank": self.lora_rank,
            "lora_targets": list(self.lora_targets),
            "lora_dropout": self.lora_dropout,
            "batch_size": self.batch_size,
            "grad_accumulation": self.grad_accumulation,
            "seq_len": self.seq_len,
            "grad_checkpointing": self.grad_checkpointing,
            "estimate_bytes": self.estimate_bytes,
            "budget_bytes": self.budget_bytes,
            "step_seconds": self.step_seconds,
            "breakdown": dict(self.breakdown),
        }


def _variants(options: PlannerOptions, precisions: Sequence[Precision]):
    """(precision, checkpointing, batch) in order of preference."""
    batches = []
    b = options.batch_size
    while b >= options.min_batch_size:
        batches.append(b)
        if b == 1:
            break
        b = max(b // 2, options.min_batch_size) if b // 2 >= options.min_batch_size else 0
    for precision in precisions:
        yield precision, False, options.batch_size
        if options.allow_grad_checkpointing:
            for batch in batches:
                yield precision, True, batch
        else:
            for batch in batches[1:]:
                yield precision, False, batch



def _runnable_precisions(budget: Budget, options: PlannerOptions) -> list[Precision]:
    """The options' precisions (or the device's defaults) that run on the device."""
    wanted = options.precisions or allowed_precisions(budget)
    quantized_ok = budget.supports_4bit
    half_ok = budget.device == "cpu" or budget.supports_bf16

    def runs(p: Precision) -> bool:
        if p in ("nf4", "int8"):
            return quantized_ok
        if p == "bf16":
            return half_ok
        return True  # fp16 runs on every CUDA GPU (and, slowly, on CPU); fp32 everywhere

    precisions = [p for p in wanted if runs(p)]
    if not precisions:
        raise ConfigError(
            f"none of the precisions {list(wanted)} runs on {budget.source} "
            f"(4-bit: {'yes' if budget.supports_4bit else 'no'}, bf16: {'yes' if budget.supports_bf16 else 'no'})"
        )
    return precisions


def _fit(
    shape: ModelShape,
    keep: tuple[int, ...],
    pruned_blocks: int,
    budget: Budget,
    options: PlannerOptions,
    precisions: Sequence[Precision],
) -> tuple[Plan | None, MemoryEstimate]:
    """The first setting (in preference order) that trains ``keep`` within the budget.

    Returns:
        ``(plan or None, the leanest estimate tried)``.
    """
    leanest: MemoryEstimate | None = None
    for precision, gc, batch in _variants(options, precisions):
        setup = TrainingSetup(
            num_layers=len(keep),
            precision=precision,
            lora_rank=options.lora_rank,
            lora_targets=options.lora_targets,
            lora_dropout=options.lora_dropout,
            batch_size=batch,
            seq_len=options.seq_len,
            optimizer=options.optimizer,
            grad_checkpointing=gc,
            device=budget.device,
            unified_memory=budget.unified_memory,
            checkpoint_precision=options.checkpoint_precision,
        )
        est = estimate_training_memory(shape, setup)
        if leanest is None or est.total_bytes < leanest.total_bytes:
            leanest = est
        if est.total_bytes <= budget.bytes:
            accumulation = -(-options.batch_size // batch)
            seconds = None
            if budget.sustained_tflops:
                seconds = training_flops(shape, setup) * accumulation / (budget.sustained_tflops * 1e12)
            plan = Plan(
                tier=tier_name(len(keep)),
                pruned_blocks=pruned_blocks,
                keep_layers=keep,
                precision=precision,
                lora_rank=options.lora_rank,
                lora_targets=tuple(options.lora_targets),
                lora_dropout=options.lora_dropout,
                batch_size=batch,
                grad_accumulation=accumulation,
                seq_len=options.seq_len,
                grad_checkpointing=gc,
                estimate_bytes=est.total_bytes,
                budget_bytes=budget.bytes,
                step_seconds=seconds,
                breakdown=dict(est.breakdown),
            )
            return plan, est
    assert leanest is not None  # _variants yields at least one setting
    return None, leanest

def plan_for_profile(
    model_config: Any,
    ranking: Sequence[Sequence[int]],
    profile: DeviceClass | DeviceProfile | Budget,
    *,
    options: PlannerOptions | None = None,
    catalog: Catalog | None = None,
    process_rss_bytes: int = 0,
) -> Plan:
    """The plan that keeps the most layers and fits the device.

    Args:
        model_config: The FULL model's config (anything
            :func:`~hardware_profiles.shape.model_shape` takes, or a ``ModelShape``).
        ranking: SGP blocks in pruning order, each a list of full-LLM layer indices.
        profile: A catalog class, a measured profile, or a ready :class:`Budget`.
        options: What the run asks for (default: :class:`PlannerOptions`).
        catalog: For a measured profile's class (default: the shipped catalog).
        process_rss_bytes: See :func:`budget_for`.

    Returns:
        The :class:`Plan`.

    Raises:
        InsufficientMemoryError: Even the most pruned tier with the leanest settings does not
            fit; the message gives that estimate and the budget.
        ConfigError: The ranking is malformed or no allowed precision runs on the device.
    """
    options = options or PlannerOptions()
    shape = model_config if isinstance(model_config, ModelShape) else model_shape(model_config)
    check_ranking(shape.num_layers, ranking)
    budget = profile if isinstance(profile, Budget) else budget_for(profile, catalog, process_rss_bytes=process_rss_bytes)
    precisions = _runnable_precisions(budget, options)
    max_k = len(ranking) if options.max_blocks is None else min(options.max_blocks, len(ranking))
    smallest = None
    for k in range(max_k + 1):
        keep = tuple(kept_layers(shape.num_layers, ranking, k))
        plan, leanest = _fit(shape, keep, k, budget, options, precisions)
        if plan is not None:
            return plan
        if smallest is None or leanest.total_bytes < smallest[0].total_bytes:
            smallest = (leanest, k, keep)
    assert smallest is not None
    est, k, keep = smallest
    s = est.setup
    raise InsufficientMemoryError(
        f"nothing fits {budget.source}: budget {describe_bytes(budget.bytes)}, but the leanest plan "
        f"({len(keep)} of {shape.num_layers} layers after pruning {k} blocks, {s.precision}, batch {s.batch_size} x "
        f"{s.seq_len} tokens, LoRA rank {s.lora_rank}, checkpointing {'on' if s.grad_checkpointing else 'off'}) "
        f"needs {describe_bytes(est.total_bytes)}. Free memory, shorten seq_len, or prune more blocks."
    )


def plan_tiers(
    model_config: Any,
    ranking: Sequence[Sequence[int]],
    devices: Sequence[DeviceClass],
    *,
    options: PlannerOptions | None = None,
) -> dict[str, Plan | str]:
    """Plans for several device classes (e.g. the whole catalog); nested by construction.

    Args:
        model_config: The full model's config.
        ranking: SGP blocks in pruning order.
        devices: Catalog classes.
        options: Planner options.

    Returns:
        Class name -> its plan, or the reason nothing fits.
    """
    out: dict[str, Plan | str] = {}
    for device in devices:
        try:
            out[device.name] = plan_for_profile(model_config, ranking, device, options=options)
        except (InsufficientMemoryError, ConfigError) as exc:
            out[device.name] = str(exc)
    return out


def assign_tier(
    client_id: str,
    profile: DeviceProfile,
    model_config: Any,
    tiers: Mapping[str, Sequence[int]],
    training: TrainingParams,
    *,
    precision: Precision = "nf4",
    catalog: Catalog | None = None,
) -> Assignment:
    """The coordinator's answer to a Hello: the deepest prepared tier the client can train.

    The run's tiers are fixed (prepared packages in one precision) and the batch is the
    schedule's, so only gradient checkpointing may give way here.

    Args:
        client_id: The client.
        profile: Its measured profile (from its Hello).
        model_config: The full model's config.
        tiers: Tier name -> kept full-LLM layer indices (the prepared packages).
        training: The run's training parameters.
        precision: Precision of the prepared packages.
        catalog: Catalog for the profile's class.

    Returns:
        An accepted Assignment with the plan, or a refused one whose reason has the numbers.
    """
    if not tiers:
        return Assignment(client_id=client_id, accepted=False, tier="", reason="the run has no prepared tier", plan={})
    budget = budget_for(profile, catalog)
    if precision in ("nf4", "int8") and not budget.supports_4bit:
        return Assignment(
            client_id=client_id,
            accepted=False,
            tier="",
            reason=(
                f"the run publishes {precision} packages but bitsandbytes 4/8-bit does not run on "
                f"{profile.device_class} ({profile.gpu_name or profile.accelerator}); run the coordinator with a "
                "bf16 or fp32 package precision for such devices"
            ),
            plan={},
        )
    shape = model_shape(model_config)
    options = PlannerOptions.from_training(training, precisions=(precision,))
    precisions = _runnable_precisions(budget, options)
    leanest: tuple[str, MemoryEstimate] | None = None
    for name, keep in sorted(tiers.items(), key=lambda item: (-len(item[1]), item[0])):
        keep_t = tuple(sorted(int(i) for i in keep))
        plan, est = _fit(shape, keep_t, -1, budget, options, precisions)
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
    return Assignment(
        client_id=client_id,
        accepted=False,
        tier="",
        reason=(
            f"no prepared tier fits {budget.source}: budget {describe_bytes(budget.bytes)}, the smallest tier {name} "
            f"needs {describe_bytes(est.total_bytes)} even with gradient checkpointing"
        ),
        plan={},
    )



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
) -> MemoryCheck:
    """Re-estimate an assigned plan against the memory free now (the client's preflight).

    Args:
        model_config: The FULL model's config (the plan's ``keep_layers`` cut it).
        plan: :meth:`Plan.to_dict` output (``Assignment.plan``).
        profile: The client's freshly measured profile (or a class / budget).
        catalog: Catalog for the profile's class.
        process_rss_bytes: The calling process's resident set (see :func:`budget_for`).

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
    budget = profile if isinstance(profile, Budget) else budget_for(profile, catalog, process_rss_bytes=process_rss_bytes)
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
