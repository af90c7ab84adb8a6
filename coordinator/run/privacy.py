"""DP-FedAvg's privacy budget: the (epsilon, delta) a run spent, from its rounds.

The clients add the noise (``edge_client.privacy``): in a round that selected ``n`` clients,
each clips its delta to ``C`` and adds Gaussian noise of standard deviation ``z C / sqrt(n)``.
The ``m`` updates that arrive sum to a Gaussian mechanism of noise ``z C sqrt(m / n)`` on a
sensitivity of ``C`` (one client's whole contribution: client-level privacy, a client added or
removed). The coordinator averages them with equal weights, which is post-processing.

Two budgets, from the same rounds:

* **aggregate**: against anyone who sees only what the coordinator publishes (the global
  adapters, the exported adapter): multiplier ``z sqrt(m / n)`` per round, the smallest over
  the run's rounds;
* **coordinator**: against the coordinator itself, which sees each update with its own noise
  only: multiplier ``z / sqrt(n)``, the smallest over the rounds.

Each is composed over the aggregated rounds with Renyi DP: ``T alpha / (2 z^2)`` at order
``alpha``, turned into epsilon with ``eps = min over alpha of RDP(alpha) + log(1/delta) / (alpha - 1)``
(Mironov 2017), whose minimum is ``T / (2 z^2) + sqrt(2 T log(1/delta)) / z``. Rounds are not
subsampled in the accounting (every selected client is counted in every round it was
selected), so the budget is an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from coordinator.run.round_state import RoundRecord
from coordinator.settings import PrivacySettings


def gaussian_epsilon(noise_multiplier: float, compositions: int, delta: float) -> float:
    """Epsilon of ``compositions`` Gaussian mechanisms of multiplier ``noise_multiplier`` at ``delta``.

    Args:
        noise_multiplier: z, the noise standard deviation over the sensitivity (> 0).
        compositions: How many times the mechanism ran (0 spends nothing).
        delta: The delta of the budget, in (0, 1).

    Returns:
        The epsilon (0.0 for no compositions).

    Raises:
        ValueError: A multiplier or delta outside its range.
    """
    if not (noise_multiplier > 0 and 0 < delta < 1):
        raise ValueError(f"noise_multiplier must be > 0 and delta in (0, 1), got {noise_multiplier} and {delta}")
    if compositions <= 0:
        return 0.0
    z, t, log_inv_delta = noise_multiplier, compositions, math.log(1 / delta)
    return t / (2 * z * z) + math.sqrt(2 * t * log_inv_delta) / z


def privacy_report(settings: PrivacySettings, records: Iterable[RoundRecord]) -> dict[str, Any]:
    """What a DP-FedAvg run spent, for ``report.json``.

    Args:
        settings: The run's ``[privacy]`` section (must be enabled).
        records: The run's round records (only aggregated rounds count).

    Returns:
        The settings, the rounds counted, the effective multipliers and both epsilons.
    """
    aggregated = [r for r in records if r.outcome == "aggregated" and r.participants]
    z = settings.noise_multiplier
    if aggregated:
        z_aggregate = z * min(math.sqrt(len(r.reported) / len(r.participants)) for r in aggregated)
        z_coordinator = z / math.sqrt(max(len(r.participants) for r in aggregated))
    else:
        z_aggregate = z_coordinator = z
    rounds = len(aggregated)
    return {
        "mechanism": "DP-FedAvg, Gaussian noise added by the clients, equal weights, Renyi DP accounting",
        "clip_norm": settings.clip_norm,
        "noise_multiplier": z,
        "delta": settings.delta,
        "rounds": rounds,
        "noise_multiplier_aggregate": z_aggregate,
        "epsilon_aggregate": gaussian_epsilon(z_aggregate, rounds, settings.delta),
        "noise_multiplier_coordinator": z_coordinator,
        "epsilon_coordinator": gaussian_epsilon(z_coordinator, rounds, settings.delta),
    }
