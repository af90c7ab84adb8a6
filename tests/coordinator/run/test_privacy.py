"""DP-FedAvg's budget: Renyi DP composition of the rounds, against the aggregate and the coordinator."""

from __future__ import annotations

import math

import pytest

from coordinator.run.privacy import gaussian_epsilon, privacy_report
from coordinator.run.round_state import RoundRecord
from coordinator.settings import PrivacySettings, RunConfig
from shared.errors import ConfigError
from shared.protocol import TrainingParams


def _record(round_: int, selected: int, reported: int, outcome: str = "aggregated") -> RoundRecord:
    clients = [f"c{i}" for i in range(selected)]
    return RoundRecord(
        round=round_, participants=tuple((c, "t") for c in clients), quorum=1, started_at=0.0, deadline=1.0,
        reported=tuple(clients[:reported]), outcome=outcome,
    )


def test_epsilon_is_the_minimum_of_the_renyi_bound() -> None:
    z, t, delta = 1.1, 5, 1e-5
    grid = min(t * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in (1 + i / 1000 for i in range(1, 200_000)))
    assert gaussian_epsilon(z, t, delta) == pytest.approx(grid, rel=1e-6)
    assert gaussian_epsilon(1.0, 1, 1e-5) == pytest.approx(0.5 + math.sqrt(2 * math.log(1e5)))
    assert gaussian_epsilon(z, 0, delta) == 0.0
    # More rounds spend more; more noise spends less.
    assert gaussian_epsilon(z, 10, delta) > gaussian_epsilon(z, 5, delta) > gaussian_epsilon(2 * z, 5, delta)
    with pytest.raises(ValueError, match="noise_multiplier must be > 0"):
        gaussian_epsilon(0.0, 3, delta)


def test_the_report_counts_aggregated_rounds_and_missing_clients() -> None:
    settings = PrivacySettings(enabled=True, clip_norm=0.5, noise_multiplier=2.0, delta=1e-6)
    records = [_record(1, 4, 4), _record(2, 4, 1), _record(3, 4, 0, outcome="failed")]
    report = privacy_report(settings, records)
    assert report["rounds"] == 2
    # Round 2: one of four reported, so its sum carries a quarter of the noise variance.
    assert report["noise_multiplier_aggregate"] == pytest.approx(2.0 * math.sqrt(1 / 4))
    assert report["epsilon_aggregate"] == pytest.approx(gaussian_epsilon(1.0, 2, 1e-6))
    # The coordinator sees each update with its own noise only: z / sqrt(n).
    assert report["noise_multiplier_coordinator"] == pytest.approx(1.0)
    assert report["epsilon_coordinator"] == pytest.approx(gaussian_epsilon(1.0, 2, 1e-6))


def test_privacy_settings_are_validated_and_the_wire_fields_are_the_coordinators() -> None:
    with pytest.raises(ConfigError, match="privacy.clip_norm and privacy.noise_multiplier must be > 0"):
        PrivacySettings(enabled=True, clip_norm=0.0)
    training = TrainingParams(local_steps=1, learning_rate=1e-3, batch_size=1, seq_len=8, lora_rank=2, lora_alpha=4.0,
                              lora_dropout=0.0, target_modules=["q_proj"], mu=0.0, seed=0, dp_clip_norm=1.0)
    with pytest.raises(ConfigError, match=r"set \[privacy\]"):
        RunConfig(training=training)
