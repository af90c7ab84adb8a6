"""The aggregation extension point: an ABC and a name -> class registry for the CLI."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import ClassVar, TypeVar

import torch

from shared.errors import ConfigError, UpdateRejectedError

StateDict = dict[str, torch.Tensor]
"""Adapter tensors keyed by canonical full-LLM adapter key (see ``shared.adapters``)."""


class AggregationStrategy(ABC):
    """Combines client deltas into a new global adapter.

    ``updates`` may be a generator that loads one delta at a time from disk. A strategy that
    can stream (FedAvg) keeps only per-key running sums, so memory stays flat in the number
    of clients; order statistics (median, trimmed mean) hold every client's delta at once.
    Influence bounds (``coordinator.run.aggregation.bounds``) are applied before a strategy
    sees the deltas, so every strategy gets capped weights and clipped deltas.

    Attributes:
        name: Registry name the CLI selects the strategy by.
    """

    name: ClassVar[str]

    @abstractmethod
    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterable[tuple[float, Mapping[str, torch.Tensor]]],
    ) -> StateDict:
        """Return the next global adapter.

        Args:
            global_state: Current global adapter, key -> tensor (any shape); not modified.
            updates: ``(weight, delta)`` per accepted client (the weight: its example
                count, capped by the influence bounds), where ``delta`` maps a
                subset of adapter keys (the layers the client's tier holds, possibly keys
                not yet in ``global_state``) to tensors shaped like the global ones.
                Consumed once.

        Returns:
            A new dict with every key of ``global_state`` plus any new key a client held,
            each tensor in the dtype of the global one (or of the first delta for new keys).

        Raises:
            UpdateRejectedError: An update is inconsistent (a weight that is not a positive
                finite number, a
                shape that disagrees with the global adapter or another client).
        """


def check_weight(weight: object, index: int) -> None:
    """Refuse a weight no accepted update has (strategies call it for each update).

    Args:
        weight: The update's aggregation weight.
        index: Its position in the round, for the message.

    Raises:
        UpdateRejectedError: It is not a positive finite number.
    """
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise UpdateRejectedError(f"update {index} has weight {weight!r}; it must be a positive finite number")


_REGISTRY: dict[str, type[AggregationStrategy]] = {}

S = TypeVar("S", bound=type[AggregationStrategy])


def register_strategy(cls: S) -> S:
    """Class decorator: make ``cls`` selectable by its ``name``.

    Args:
        cls: A concrete :class:`AggregationStrategy` subclass with a unique ``name``.

    Returns:
        ``cls`` unchanged.

    Raises:
        ValueError: Another class already holds the name (a programming error).
    """
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"aggregation strategy name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_strategies() -> list[str]:
    """Sorted names accepted by :func:`get_strategy`."""
    return sorted(_REGISTRY)


def get_strategy(name: str, **kwargs: object) -> AggregationStrategy:
    """Instantiate the strategy registered as ``name``.

    Args:
        name: Registry name, e.g. ``"fedavg"`` (case-insensitive).
        **kwargs: Passed to the strategy's constructor.

    Returns:
        The strategy.

    Raises:
        ConfigError: No strategy has that name.
    """
    cls = _REGISTRY.get(name.lower())
    if cls is None:
        raise ConfigError(
            f"unknown aggregation strategy {name!r}; choose one of {', '.join(available_strategies())}"
        )
    return cls(**kwargs)
