"""Coordinate-wise robust aggregators: the median and the trimmed mean of the clients' deltas.

Beside FedAvg for runs where some admitted clients may be hostile (Yin et al. 2018,
"Byzantine-robust distributed learning"): each coordinate of the update is the median (or
the mean after dropping the largest and smallest ``ceil(trim_ratio x n)`` values) over the
clients that hold that key, so a minority of arbitrary deltas cannot drag it far. Both
ignore the example weights (an order statistic has no natural weighting, and a weight is
exactly what a hostile client would inflate) and hold every client's delta at once, so
memory grows with the number of clients (one adapter's size per client).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Mapping

import torch

from coordinator.run.aggregation.base import (
    AggregationStrategy,
    StateDict,
    check_weight,
    register_strategy,
)
from shared.errors import ConfigError, UpdateRejectedError


class _OrderStatistic(AggregationStrategy):
    """Gathers each key's deltas over its holders, then reduces them coordinate-wise."""

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterable[tuple[float, Mapping[str, torch.Tensor]]],
    ) -> StateDict:
        """See :meth:`AggregationStrategy.aggregate`."""
        held: dict[str, list[torch.Tensor]] = {}
        dtypes: dict[str, torch.dtype] = {k: v.dtype for k, v in global_state.items()}
        for index, (weight, delta) in enumerate(updates):
            check_weight(weight, index)
            for key, tensor in delta.items():
                ref = held[key][0] if key in held else global_state.get(key)
                if ref is not None and tuple(tensor.shape) != tuple(ref.shape):
                    raise UpdateRejectedError(
                        f"update {index}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
                    )
                held.setdefault(key, []).append(tensor.detach().to(torch.float32))
                dtypes.setdefault(key, tensor.dtype)
        out: StateDict = {k: v.detach().clone() for k, v in global_state.items()}
        for key, tensors in held.items():
            change = self.reduce(torch.stack(tensors))
            base = out[key].to(torch.float32) if key in out else torch.zeros_like(change)
            out[key] = (base + change).to(dtypes[key])
        return out

    @abstractmethod
    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """Combine ``stacked`` (clients x key shape, float32) into one tensor of the key's shape."""


@register_strategy
class CoordinateMedian(_OrderStatistic):
    """Coordinate-wise median over each key's holders (the mean of the two middle values
    for an even count, so two honest clients are averaged, not one of them picked)."""

    name = "median"

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """See :meth:`_OrderStatistic.reduce`."""
        n = stacked.shape[0]
        ordered = torch.sort(stacked, dim=0).values
        return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


@register_strategy
class TrimmedMean(_OrderStatistic):
    """Coordinate-wise mean after dropping the ``ceil(trim_ratio x n)`` largest and smallest
    values of each coordinate (never all of them: at least one value stays).

    Args:
        trim_ratio: Fraction of the holders trimmed at each end, in [0, 0.5).
    """

    name = "trimmed_mean"

    def __init__(self, trim_ratio: float = 0.2) -> None:
        if not 0.0 <= trim_ratio < 0.5:
            raise ConfigError(f"aggregation.trim_ratio must be in [0, 0.5), got {trim_ratio!r}")
        self.trim_ratio = trim_ratio

    def trimmed(self, n: int) -> int:
        """How many values are dropped at each end of ``n``."""
        return min(math.ceil(self.trim_ratio * n), (n - 1) // 2)

    def reduce(self, stacked: torch.Tensor) -> torch.Tensor:
        """See :meth:`_OrderStatistic.reduce`."""
        n = stacked.shape[0]
        cut = self.trimmed(n)
        ordered = torch.sort(stacked, dim=0).values
        return ordered[cut : n - cut].mean(dim=0)
