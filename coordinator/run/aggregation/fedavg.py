"""FedAvg over layer-mapped LoRA adapters, per parameter over the clients that hold it."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch

from coordinator.run.aggregation.base import (
    AggregationStrategy,
    StateDict,
    check_weight,
    register_strategy,
)
from shared.errors import UpdateRejectedError

logger = logging.getLogger(__name__)


@register_strategy
class FedAvg(AggregationStrategy):
    """Example-weighted average of deltas, per key over that key's holders.

    ``theta[key] += sum_c (n_c / sum_{holders of key} n) * delta_c[key]``. Each key
    (LoRA A and B alike) is averaged on its own, which is what lets tiers of different
    depth share one global adapter: a layer only the deeper tiers hold is averaged over
    those tiers alone. Sums are accumulated in float32 whatever the wire dtype.
    """

    name = "fedavg"

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterable[tuple[float, Mapping[str, torch.Tensor]]],
    ) -> StateDict:
        """See :meth:`AggregationStrategy.aggregate`."""
        sums: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}
        dtypes: dict[str, torch.dtype] = {k: v.dtype for k, v in global_state.items()}
        n_updates = 0
        for weight, delta in updates:
            check_weight(weight, n_updates)
            _accumulate(sums, weights, dtypes, global_state, delta, float(weight), n_updates)
            n_updates += 1
            # Drop our reference before pulling the next update, so a generator that loads
            # deltas from disk can free this one.
            del delta
        if n_updates == 0:
            logger.warning("aggregating zero updates: the global adapter is unchanged")
        out: StateDict = {k: v.detach().clone() for k, v in global_state.items()}
        for key, total in sums.items():
            # A key no client held before starts from zero, like a fresh LoRA delta target.
            base = out[key].to(torch.float32) if key in out else torch.zeros_like(total)
            out[key] = (base + total / weights[key]).to(dtypes[key])
        return out


def _accumulate(
    sums: dict[str, torch.Tensor],
    weights: dict[str, float],
    dtypes: dict[str, torch.dtype],
    global_state: Mapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    weight: float,
    index: int,
) -> None:
    """Add ``weight * delta`` into the running float32 sums (a function so no local
    outlives the call and keeps a client's tensor alive)."""
    for key, tensor in delta.items():
        ref = sums.get(key, global_state.get(key))
        if ref is not None and tuple(tensor.shape) != tuple(ref.shape):
            raise UpdateRejectedError(
                f"update {index}: {key} has shape {tuple(tensor.shape)}, expected {tuple(ref.shape)}"
            )
        if key in sums:
            # In place with alpha: no temporary per tensor (add_ upcasts bf16/fp16 into fp32).
            sums[key].add_(tensor.detach(), alpha=weight)
        else:
            sums[key] = tensor.detach().to(torch.float32) * weight
            dtypes.setdefault(key, tensor.dtype)
        weights[key] = weights.get(key, 0.0) + weight
