"""Bounds on how far one client can move a round, applied before any aggregation strategy.

An admitted client can still be hostile: it can claim a huge example count at hello, or send
a delta a hundred times the honest ones. Refusing only what is absurd (``max_delta_norm``)
leaves it owning the round. So every round, from the updates' own statistics:

* **weights** are capped at ``weight_cap`` x the round's median weight;
* **deltas are clipped** (scaled down, not refused) to ``clip`` x the round's median L2 norm,
  over the whole delta and, with ``clip_per_key``, per adapter key against the median norm of
  that key's holders. The whole-delta bound is taken per square root of the number of keys a
  client holds (``norm / sqrt(keys)``), so a deeper tier, which holds more layers, is not
  clipped for that;
* **a key held by fewer than ``min_holders`` clients** is left as it was this round, so a
  layer only one client trains is not that client's alone to set.

The median is the *low* median of the norms that are not zero: with an even count the
upper middle value may be an attacker's (with two clients, it is half of them), and a key a
client did not change (norm 0) says nothing about how far the others may change it. A client's contribution to the round is
then at most ``weight_cap x clip`` times the median client's, whatever it sends.

:func:`bound_round` is pure (statistics in, factors out); :func:`bounded_delta` applies one
client's factors to its tensors. The factors are recorded per round
(:meth:`RoundInfluence.to_json`), so an audit recomputes the same aggregate.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class InfluenceLimits:
    """How far one client may move a round, relative to the round's median client (the
    values of ``[aggregation]``, validated there).

    Attributes:
        weight_cap: A weight above this multiple of the round's median weight is cut to it
            (``math.inf`` disables).
        clip: A delta whose L2 norm is above this multiple of the round's median norm is
            scaled down to it (``math.inf`` disables).
        clip_per_key: Also clip each adapter key to ``clip`` x the median norm of that key
            over the clients that hold it.
        min_holders: A key fewer clients than this hold is not changed this round.
    """

    weight_cap: float = 2.0
    clip: float = 2.0
    clip_per_key: bool = True
    min_holders: int = 1

    @classmethod
    def from_settings(cls, settings: Any) -> InfluenceLimits:
        """The limits of an ``[aggregation]`` section (:class:`coordinator.settings.AggregationSettings`)."""
        return cls(weight_cap=float(settings.weight_cap), clip=float(settings.clip),
                   clip_per_key=bool(settings.clip_per_key), min_holders=int(settings.min_holders))


@dataclass(frozen=True)
class UpdateStats:
    """What the bounds need to know of one accepted update (no tensors).

    Attributes:
        client_id: Its sender.
        weight: Its example count (already no more than the client declared at hello).
        norm: L2 norm of the whole delta.
        key_norms: L2 norm of each key it holds.
    """

    client_id: str
    weight: float
    norm: float
    key_norms: Mapping[str, float]


@dataclass(frozen=True)
class ClientInfluence:
    """The factors one client's update is aggregated with.

    Attributes:
        client_id: The client.
        claimed_weight: Its example count.
        weight: The weight it is aggregated with (the claim, capped).
        norm: L2 norm of its delta as sent.
        scale: Factor applied to every key (1.0: not clipped).
        key_scales: Keys clipped harder than ``scale`` by the per-key bound, with their factor.
    """

    client_id: str
    claimed_weight: float
    weight: float
    norm: float
    scale: float
    key_scales: dict[str, float] = field(default_factory=dict)

    def factor(self, key: str) -> float:
        """The factor applied to ``key``."""
        return self.key_scales.get(key, self.scale)


@dataclass(frozen=True)
class RoundInfluence:
    """Every factor of one round's aggregation, and the bounds they came from.

    Attributes:
        limits: The limits in force.
        weight_bound: The largest weight a client was aggregated with.
        norm_bound: The largest ``norm / sqrt(keys held)`` after clipping (a client holding
            ``n`` keys is clipped to ``norm_bound x sqrt(n)``).
        clients: One entry per update, in the order they were aggregated.
        skipped_keys: Keys left unchanged because too few clients held them.
    """

    limits: InfluenceLimits
    weight_bound: float
    norm_bound: float
    clients: tuple[ClientInfluence, ...]
    skipped_keys: tuple[str, ...] = ()

    def client(self, client_id: str) -> ClientInfluence:
        """The factors of ``client_id``'s update.

        Raises:
            KeyError: The client had no update in the round.
        """
        for entry in self.clients:
            if entry.client_id == client_id:
                return entry
        raise KeyError(client_id)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite bounds as the string ``"inf"``)."""
        return _finite(asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundInfluence:
        """Read what :meth:`to_json` wrote."""
        limits = data["limits"]
        return cls(
            limits=InfluenceLimits(
                weight_cap=float(limits["weight_cap"]),
                clip=float(limits["clip"]),
                clip_per_key=bool(limits["clip_per_key"]),
                min_holders=int(limits["min_holders"]),
            ),
            weight_bound=float(data["weight_bound"]),
            norm_bound=float(data["norm_bound"]),
            clients=tuple(
                ClientInfluence(
                    client_id=str(c["client_id"]),
                    claimed_weight=float(c["claimed_weight"]),
                    weight=float(c["weight"]),
                    norm=float(c["norm"]),
                    scale=float(c["scale"]),
                    key_scales={str(k): float(v) for k, v in c["key_scales"].items()},
                )
                for c in data["clients"]
            ),
            skipped_keys=tuple(str(k) for k in data["skipped_keys"]),
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def bound_round(stats: Iterable[UpdateStats], limits: InfluenceLimits) -> RoundInfluence:
    """The factors that keep every client of one round within ``limits``.

    Args:
        stats: One entry per accepted update of the round.
        limits: The bounds.

    Returns:
        The factors, per client in the order given.
    """
    stats = list(stats)
    if not stats:
        return RoundInfluence(limits, 0.0, 0.0, ())
    weight_bound = limits.weight_cap * statistics.median_low(s.weight for s in stats)
    norm_bound = limits.clip * _median_of_changes([_per_key(s) for s in stats])
    holders: dict[str, list[float]] = {}
    for s in stats:
        for key, n in s.key_norms.items():
            holders.setdefault(key, []).append(n)
    key_bounds = (
        {key: limits.clip * _median_of_changes(norms) for key, norms in holders.items()}
        if limits.clip_per_key
        else {}
    )
    clients = []
    for s in stats:
        scale = _shrink(_per_key(s), norm_bound)
        key_scales = {}
        for key, n in s.key_norms.items():
            bound = key_bounds.get(key)
            if bound is not None and (k := min(scale, _shrink(n, bound))) < scale:
                key_scales[key] = k
        clients.append(ClientInfluence(s.client_id, s.weight, min(s.weight, weight_bound), s.norm, scale, key_scales))
    skipped = tuple(sorted(k for k, norms in holders.items() if len(norms) < limits.min_holders))
    return RoundInfluence(limits, min(weight_bound, max(s.weight for s in stats)), norm_bound, tuple(clients), skipped)


def _median_of_changes(norms: list[float]) -> float:
    """The low median of the norms that are not zero (``inf``, no bound, when all are zero).

    A zero norm is a key a client did not change (LoRA A after one step from a zero B, say):
    a median of zero would clip every other client's change of that key to nothing.
    """
    moved = [n for n in norms if n > 0.0]
    return statistics.median_low(moved) if moved else math.inf


def _per_key(s: UpdateStats) -> float:
    """The whole-delta norm per square root of the keys held (what the overall bound compares)."""
    return s.norm / math.sqrt(max(1, len(s.key_norms)))


def _shrink(norm: float, bound: float) -> float:
    """The factor that brings ``norm`` down to ``bound`` (1.0 when it is within it)."""
    return 1.0 if norm <= bound or norm == 0.0 else bound / norm


def bounded_delta(
    delta: Mapping[str, torch.Tensor], influence: ClientInfluence, skipped_keys: Iterable[str] = ()
) -> dict[str, torch.Tensor]:
    """One client's delta as it is aggregated: clipped, without the skipped keys.

    Args:
        delta: The delta as the client sent it.
        influence: Its factors.
        skipped_keys: Keys held by too few clients this round.

    Returns:
        A new dict; tensors not clipped are the same objects (no copy).
    """
    skip = set(skipped_keys)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in delta.items():
        if key in skip:
            continue
        f = influence.factor(key)
        out[key] = tensor if f == 1.0 else (tensor.to(torch.float32) * f).to(tensor.dtype)
    return out


def delta_norms(delta: Mapping[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    """The L2 norm of a whole delta and of each of its keys (computed in float64).

    Args:
        delta: Key -> tensor.

    Returns:
        ``(norm, {key: norm})``.
    """
    per_key = {k: float(torch.linalg.vector_norm(t.to(torch.float64))) for k, t in delta.items()}
    return math.sqrt(sum(n * n for n in per_key.values())), per_key
