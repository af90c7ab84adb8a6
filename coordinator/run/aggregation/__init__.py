"""Aggregation strategies, selectable by name (``get_strategy("fedavg")``)."""

from __future__ import annotations

from coordinator.run.aggregation.base import (
    AggregationStrategy,
    StateDict,
    available_strategies,
    get_strategy,
    register_strategy,
)
from coordinator.run.aggregation.fedavg import FedAvg

__all__ = [
    "AggregationStrategy",
    "FedAvg",
    "StateDict",
    "available_strategies",
    "get_strategy",
    "register_strategy",
]
