"""The aggregation extension point: an ABC and a name -> class registry for the CLI."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import ClassVar, TypeVar

import torch

from shared.errors import ConfigError

StateDict = dict[str, torch.Tensor]
"""Adapter tensors keyed by canonical full-LLM adapter key (see ``shared.adapters``)."""


class AggregationStrategy(ABC):
    """Combines client deltas into a new global adapter.

    Implementations must stream: ``updates`` may be a generator that loads one delta at a
    time from disk, and a strategy keeps only per-key running sums, never a client's
    tensors, so memory stays flat in the number of clients.

    Attributes:
        name: Registry name the CLI selects the strategy by.
    """

    name: ClassVar[str]

    @abstractmethod
    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterable[tuple[int, Mapping[str, torch.Tensor]]],
    ) -> StateDict:
        """Return the next global adapter.

        Args:
            global_state: Current global adapter, key -> tensor (any shape); not modified.
            updates: ``(num_examples, delta)`` per accepted client, where ``delta`` maps a
                subset of adapter keys (the layers the client's tier holds, possibly keys
                not yet in ``global_state``) to tensors shaped like the global ones.
                Consumed once.

        Returns:
            A new dict with every key of ``global_state`` plus any new key a client held,
            each tensor in the dtype of the global one (or of the first delta for new keys).

        Raises:
            UpdateRejectedError: An update is inconsistent (non-positive example count, a
                shape that disagrees with the global adapter or another client).
        """


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
