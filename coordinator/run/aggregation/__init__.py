"""Aggregation strategies, selectable by name (``get_strategy("fedavg")``), and the
influence bounds every round applies before its strategy (``aggregate_round``)."""

from __future__ import annotations

from coordinator.run.aggregation.base import (
    AggregationStrategy,
    StateDict,
    available_strategies,
    get_strategy,
    register_strategy,
)
from coordinator.run.aggregation.bounds import (
    InfluenceLimits,
    RoundInfluence,
    delta_norms,
)
from coordinator.run.aggregation.fedavg import FedAvg
from coordinator.run.aggregation.order_statistics import CoordinateMedian, TrimmedMean
from coordinator.run.aggregation.rounds import aggregate_round

__all__ = [
    "AggregationStrategy",
    "CoordinateMedian",
    "FedAvg",
    "InfluenceLimits",
    "RoundInfluence",
    "StateDict",
    "TrimmedMean",
    "aggregate_round",
    "available_strategies",
    "delta_norms",
    "get_strategy",
    "register_strategy",
]
