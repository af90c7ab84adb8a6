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

The device's budget and the precisions it runs come from :mod:`hardware_profiles.budget`;
the coordinator's answer to one client (the deepest *prepared* tier that fits) and the
client's re-check of it are in :mod:`hardware_profiles.assignment`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hardware_profiles.budget import Budget, budget_for, runnable_precisions
from hardware_profiles.flops import training_flops
from hardware_profiles.memory import (
    MemoryEstimate,
    describe_bytes,
    estimate_training_memory,
)
from hardware_profiles.profile import Catalog, DeviceClass
from hardware_profiles.shape import ModelShape, model_shape
from hardware_profiles.training_setup import (
    PRECISIONS,
    Optimizer,
    Precision,
    TrainingSetup,
)
from shared.errors import ConfigError, InsufficientMemoryError
from shared.layermap import check_ranking, kept_layers, tier_name
from shared.protocol import DeviceProfile, TrainingParams


@dataclass(frozen=True)
class PlannerOptions:
    """What the run asks for and how far the planner may give way.

    Attributes:
        precisions: Precisions to try, in order; ``None``:
            :func:`~hardware_profiles.budget.allowed_precisions`. Precisions the device
            cannot run are dropped.
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
        pruned_blocks: Blocks of the ranking pruned (k). In a plan from
            :func:`~hardware_profiles.assignment.assign_tier`,
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


def fit_tier(
    shape: ModelShape,
    keep: tuple[int, ...],
    pruned_blocks: int,
    budget: Budget,
    options: PlannerOptions,
    precisions: Sequence[Precision],
) -> tuple[Plan | None, MemoryEstimate]:
    """The first setting, in order of preference, that trains the layers ``keep`` within the budget.

    For each precision in turn: the requested batch, then gradient checkpointing (where the
    options allow it) with batches halved down to ``options.min_batch_size``.

    Args:
        shape: The full model.
        keep: Full-LLM indices of the kept layers, ascending.
        pruned_blocks: What the plan records as :attr:`Plan.pruned_blocks`.
        budget: The device's budget.
        options: What the run asks for.
        precisions: Precisions to try, in order
            (:func:`~hardware_profiles.budget.runnable_precisions`).

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
        profile: A catalog class, a measured profile, or a ready
            :class:`~hardware_profiles.budget.Budget`.
        options: What the run asks for (default: :class:`PlannerOptions`).
        catalog: For a measured profile's class (default: the shipped catalog).
        process_rss_bytes: See :func:`~hardware_profiles.budget.budget_for`.

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
    precisions = runnable_precisions(budget, options.precisions)
    max_k = len(ranking) if options.max_blocks is None else min(options.max_blocks, len(ranking))
    smallest = None
    for k in range(max_k + 1):
        keep = tuple(kept_layers(shape.num_layers, ranking, k))
        plan, leanest = fit_tier(shape, keep, k, budget, options, precisions)
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
