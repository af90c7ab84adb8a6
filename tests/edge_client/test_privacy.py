"""DP-FedAvg on the client: the delta is clipped to the bound, then noised from the OS's randomness."""

from __future__ import annotations

import math

import pytest
import torch

from edge_client.privacy import privatize
from shared.protocol import dp_noise_std as noise_std


def _norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))


def test_a_delta_over_the_bound_is_scaled_to_it_and_one_under_is_kept() -> None:
    delta = {"a": torch.full((10, 10), 0.3), "b": torch.full((5,), -0.4)}
    out, factor = privatize(delta, clip_norm=1.0, std=0.0)
    assert _norm(out) == pytest.approx(1.0) and factor == pytest.approx(1.0 / _norm(delta))
    small = {"a": torch.full((3,), 0.01)}
    kept, factor = privatize(small, clip_norm=1.0, std=0.0)
    assert factor == 1.0 and torch.equal(kept["a"], small["a"])


def test_the_noise_has_the_given_spread_and_is_not_reproducible() -> None:
    delta = {"a": torch.zeros(200_000), "b": torch.zeros(100, 100, dtype=torch.bfloat16)}
    first, _ = privatize(delta, clip_norm=1.0, std=0.02)
    second, _ = privatize(delta, clip_norm=1.0, std=0.02)
    assert float(first["a"].std()) == pytest.approx(0.02, rel=0.02)
    assert abs(float(first["a"].mean())) < 1e-3
    assert first["b"].dtype == torch.bfloat16
    # The noise comes from the OS, not from a seed the coordinator knows: two releases differ.
    assert not torch.equal(first["a"], second["a"])
    seeded = [privatize(delta, 1.0, 0.02, generator=torch.Generator().manual_seed(5))[0]["a"] for _ in range(2)]
    assert torch.equal(*seeded)


def test_each_client_adds_its_share_of_the_rounds_noise() -> None:
    # n clients of z C / sqrt(n) each sum to noise z C.
    assert noise_std(0.5, 1.2, 4) == pytest.approx(0.3)
    assert noise_std(0.5, 1.2, 4) * math.sqrt(4) == pytest.approx(1.2 * 0.5)
    assert noise_std(0.5, 1.2, 0) == pytest.approx(0.6)  # never divides by zero
