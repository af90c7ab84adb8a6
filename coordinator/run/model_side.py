"""What the run side needs from the model side, as protocols.

The server (:mod:`coordinator.run.server`) asks for tiers, adapters, re-alignments and the
final export through :class:`ModelSide`; :class:`coordinator.model.pipeline.ModelPipeline`
implements it and :mod:`coordinator.launch` hands it over. So no module of
:mod:`coordinator.run` imports the model side, and the round loop is tested without a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from shared.protocol import Assignment, DeviceProfile, Manifest, TrainingParams


class TierLike(Protocol):
    """What the server reads of a published tier."""

    name: str
    version: int
    folder: Path
    manifest: Manifest

    def describe(self) -> dict[str, Any]:
        """Plain summary for the run report."""
        ...


class ModelSide(Protocol):
    """The model work the run side asks for (:class:`coordinator.model.pipeline.ModelPipeline`)."""

    @property
    def tiers(self) -> Mapping[str, TierLike]:
        """The published tiers, by name."""
        ...

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The round-0 global adapter (canonical full-LLM keys)."""
        ...

    def expected_shapes(self, round_num: int) -> dict[str, dict[str, tuple[int, ...]]]:
        """Per tier, the adapter keys and shapes its clients' updates of ``round_num`` must have."""
        ...

    def round_training(self, round_num: int) -> TrainingParams:
        """The training parameters the schedule of ``round_num`` carries."""
        ...

    def assign(self, client_id: str, profile: DeviceProfile) -> Assignment:
        """The tier a client gets (or a refusal with the reason)."""
        ...

    def realign(self, global_state: dict[str, torch.Tensor], version: int) -> Mapping[str, TierLike]:
        """Re-align the tiers with the global adapter and return them as ``version``."""
        ...

    def finish(self, global_state: dict[str, torch.Tensor], run_dir: Path) -> dict[str, Any]:
        """Export and evaluate the final adapter; return the results."""
        ...

    def evaluate_round(self, global_state: dict[str, torch.Tensor], round_: int) -> dict[str, Any]:
        """The global adapter's metric after ``round_`` (the per-round curve)."""
        ...
