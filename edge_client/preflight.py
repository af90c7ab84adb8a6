"""Will the assigned sub-LLM train in the memory this device really has now?

The coordinator plans from the profile a client sent at hello time; by the time the client
is about to download, other programs may have taken memory. The client re-measures and
re-estimates with the same estimator before it fetches a single chunk, and refuses with
the numbers when the tier no longer fits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hardware_profiles.memory import TrainingSetup, describe_bytes, estimate_training_memory, process_rss_bytes
from hardware_profiles.planner import budget_for
from shared.protocol import DeviceProfile, Manifest, TrainingParams


@dataclass(frozen=True)
class PreflightResult:
    """The verdict.

    Attributes:
        fits: Whether the estimate fits the budget.
        estimate_bytes: Estimated peak of training the tier with the plan's settings.
        budget_bytes: What the device offers now (margin taken off).
        reason: Both numbers in words, and what to do when it does not fit.
    """

    fits: bool
    estimate_bytes: int
    budget_bytes: int
    reason: str


def preflight(manifest: Manifest, plan: dict[str, Any], training: TrainingParams, profile: DeviceProfile) -> PreflightResult:
    """Estimate the tier's training peak and compare it with the memory available now.

    Args:
        manifest: The assigned tier's manifest (its meta carries the sub-LLM's config and layer map).
        plan: The coordinator's plan for this client (precision, batch, sequence length,
            gradient checkpointing).
        training: The run's training parameters (LoRA rank and targets).
        profile: This device, measured just now.

    Returns:
        The verdict.
    """
    budget = budget_for(profile, process_rss_bytes=process_rss_bytes())
    setup = TrainingSetup(
        num_layers=len(manifest.meta["layer_map"]),
        precision=plan["precision"],
        lora_rank=training.lora_rank,
        lora_targets=tuple(training.target_modules),
        lora_dropout=training.lora_dropout,
        batch_size=plan["batch_size"],
        seq_len=plan["seq_len"],
        grad_checkpointing=bool(plan["grad_checkpointing"]),
        device=budget.device,
        unified_memory=budget.unified_memory,
    )
    estimate = estimate_training_memory(manifest.meta["model_config"], setup).total_bytes
    words = f"needs about {describe_bytes(estimate)}, {budget.source} gives {describe_bytes(budget.bytes)}"
    if estimate > budget.bytes:
        return PreflightResult(
            False, estimate, budget.bytes,
            f"tier {manifest.tier} will not fit: it {words}; free memory (close other programs) or ask the "
            "coordinator for a smaller tier",
        )
    return PreflightResult(True, estimate, budget.bytes, words)
