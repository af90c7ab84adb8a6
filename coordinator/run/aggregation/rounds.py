"""One round's aggregation: bound each client's influence, then run the strategy.

The server and the run audit (``benchmarks.harness.audit_run``) both call
:func:`aggregate_round`, so an audit recomputes exactly what the server did from the
persisted updates and the limits the round recorded.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch

from coordinator.run.aggregation.base import AggregationStrategy, StateDict
from coordinator.run.aggregation.bounds import (
    InfluenceLimits,
    RoundInfluence,
    UpdateStats,
    bound_round,
    bounded_delta,
)


class StoredUpdate(Protocol):
    """An accepted update whose delta is read only when the strategy reaches it."""

    client_id: str
    num_examples: int

    def norms(self) -> tuple[float, Mapping[str, float]]:
        """L2 norm of the whole delta and of each key."""
        ...

    def load_delta(self) -> dict[str, torch.Tensor]:
        """The delta as the client sent it."""
        ...


def aggregate_round(
    strategy: AggregationStrategy,
    global_state: Mapping[str, torch.Tensor],
    updates: Sequence[StoredUpdate],
    limits: InfluenceLimits,
    *,
    uniform_weights: bool = False,
) -> tuple[StateDict, RoundInfluence]:
    """The next global adapter from one round's accepted updates, each within ``limits``.

    Args:
        strategy: How the bounded deltas are combined.
        global_state: The current global adapter (not modified).
        updates: The round's accepted updates, each once.
        limits: The influence bounds.
        uniform_weights: Weigh every update 1 instead of by its example count (DP-FedAvg:
            the noise is calibrated to an equal share of each client).

    Returns:
        ``(new global adapter, the factors each update was aggregated with)``.
    """
    stats = []
    for u in updates:
        norm, key_norms = u.norms()
        stats.append(UpdateStats(u.client_id, 1.0 if uniform_weights else float(u.num_examples), norm, key_norms))
    influence = bound_round(stats, limits)

    def bounded() -> Iterator[tuple[float, dict[str, torch.Tensor]]]:
        # A generator: streaming strategies hold one client's delta at a time.
        for update, factors in zip(updates, influence.clients, strict=True):
            yield factors.weight, bounded_delta(update.load_delta(), factors, influence.skipped_keys)

    return strategy.aggregate(global_state, bounded()), influence
