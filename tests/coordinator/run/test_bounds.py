"""Influence bounds (weight cap, norm clipping overall and per key, minimum holders) and the
robust strategies (coordinate-wise median and trimmed mean)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.run.aggregation import (
    CoordinateMedian,
    FedAvg,
    InfluenceLimits,
    RoundInfluence,
    TrimmedMean,
    aggregate_round,
    available_strategies,
    delta_norms,
    get_strategy,
)
from coordinator.run.aggregation.bounds import UpdateStats, bound_round, bounded_delta
from coordinator.settings import AggregationSettings, RunConfig
from shared.config import load_config
from shared.errors import ConfigError, UpdateRejectedError

A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
DEEP = "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight"
OFF = InfluenceLimits(weight_cap=math.inf, clip=math.inf, clip_per_key=False, min_holders=1)


class Stored:
    """An update as the server holds it (norms recorded, delta read on demand)."""

    def __init__(self, client_id: str, num_examples: int, delta: dict[str, torch.Tensor]) -> None:
        self.client_id, self.num_examples, self._delta = client_id, num_examples, delta
        self.loads = 0

    def norms(self) -> tuple[float, dict[str, float]]:
        return delta_norms(self._delta)

    def load_delta(self) -> dict[str, torch.Tensor]:
        self.loads += 1
        return {k: v.clone() for k, v in self._delta.items()}


def honest(seed: int, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {A: torch.randn(4, 16, generator=g) * scale, B: torch.randn(16, 4, generator=g) * scale}


def change(after: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([(after[k] - before[k]).flatten() for k in before])


GLOBAL = {A: torch.zeros(4, 16), B: torch.zeros(16, 4)}


def test_weight_inflation_and_a_huge_delta_are_held_to_k_times_the_median_client() -> None:
    # The attack of the issue: 1,000,000 examples claimed and a delta of norm ~99 against
    # three honest clients of 40 examples and norms ~0.3-0.4.
    honest_updates = [Stored(f"h{i}", 40, honest(i)) for i in range(3)]
    attacker = Stored("mallory", 1_000_000, {k: v * 3000 for k, v in honest(9).items()})
    limits = InfluenceLimits(weight_cap=2.0, clip=2.0, clip_per_key=True)
    new, influence = aggregate_round(FedAvg(), GLOBAL, [*honest_updates, attacker], limits)
    factors = influence.client("mallory")
    assert factors.claimed_weight == 1_000_000 and factors.weight == 80.0  # 2 x the median 40
    median_norm = statistics.median_low(delta_norms(u._delta)[0] for u in [*honest_updates, attacker])
    assert factors.scale * factors.norm == pytest.approx(2 * median_norm)  # all hold the same 2 keys
    # The attacker's contribution is at most weight_cap x clip = 4 times the median client's.
    contributions = {
        c.client_id: c.weight * c.scale * c.norm / sum(x.weight for x in influence.clients) for c in influence.clients
    }
    typical = statistics.median(contributions[f"h{i}"] for i in range(3))
    assert contributions["mallory"] <= 4 * typical * 1.05
    # Unbounded, the same round is the attacker's alone (> 99.9% of the change).
    unbounded, _ = aggregate_round(FedAvg(), GLOBAL, [*honest_updates, attacker], OFF)
    honest_only, _ = aggregate_round(FedAvg(), GLOBAL, honest_updates, OFF)
    off_by = float((change(unbounded, GLOBAL) - change(honest_only, GLOBAL)).norm())
    assert off_by > 100 * float(change(honest_only, GLOBAL).norm())
    bounded_off_by = float((change(new, GLOBAL) - change(honest_only, GLOBAL)).norm())
    assert bounded_off_by < 2 * float(change(honest_only, GLOBAL).norm())


def test_honest_rounds_are_left_alone() -> None:
    updates = [Stored(f"h{i}", 30 + i, honest(i)) for i in range(4)]
    bounded, influence = aggregate_round(FedAvg(), GLOBAL, updates, InfluenceLimits())
    plain, _ = aggregate_round(FedAvg(), GLOBAL, updates, OFF)
    assert all(c.scale == 1.0 and not c.key_scales and c.weight == c.claimed_weight for c in influence.clients)
    for k in GLOBAL:
        assert torch.equal(bounded[k], plain[k])


def test_a_delta_hidden_in_one_key_is_clipped_per_key() -> None:
    # Honest lora_B deltas are ten times smaller than lora_A's. The attacker's delta has the
    # honest overall norm, all of it in lora_B: only the per-key bound sees it.
    h = [Stored(f"h{i}", 40, {A: d[A], B: d[B] * 0.1}) for i, d in enumerate(honest(i) for i in range(3))]
    total = delta_norms(h[0]._delta)[0]
    sneaky = {A: torch.zeros(4, 16), B: torch.full((16, 4), total / 8.0)}
    attacker = Stored("mallory", 40, sneaky)
    _, influence = aggregate_round(FedAvg(), GLOBAL, [*h, attacker], InfluenceLimits(clip=2.0, clip_per_key=True))
    factors = influence.client("mallory")
    assert factors.scale == 1.0 and B in factors.key_scales
    key_median = statistics.median_low(delta_norms(u._delta)[1][B] for u in [*h, attacker])
    assert factors.key_scales[B] * delta_norms(sneaky)[1][B] == pytest.approx(2 * key_median)
    _, without = aggregate_round(FedAvg(), GLOBAL, [*h, attacker], InfluenceLimits(clip=2.0, clip_per_key=False))
    assert not without.client("mallory").key_scales


def test_two_clients_use_the_low_median() -> None:
    # With two clients the upper median is the attacker's own norm: the low one bounds it.
    stats = [UpdateStats("h", 40, 0.4, {A: 0.4}), UpdateStats("m", 4000, 40.0, {A: 40.0})]
    influence = bound_round(stats, InfluenceLimits(weight_cap=2.0, clip=2.0))
    m = influence.client("m")
    assert m.weight == 80 and m.scale == pytest.approx(0.8 / 40.0)  # one key each: sqrt(1)
    assert influence.client("h").scale == 1.0 and influence.norm_bound == pytest.approx(0.8)


def test_a_key_another_client_left_unchanged_does_not_clip_it_to_nothing() -> None:
    # One step of LoRA from a zero B leaves A unchanged (norm 0): that zero is not a bound.
    stats = [UpdateStats("still", 8, 0.5, {A: 0.0, B: 0.5}), UpdateStats("moved", 8, 0.6, {A: 0.3, B: 0.5})]
    influence = bound_round(stats, InfluenceLimits(clip=2.0, clip_per_key=True))
    assert influence.client("moved").factor(A) == 1.0 and influence.client("moved").scale == 1.0
    nothing = bound_round([UpdateStats("z", 1, 0.0, {A: 0.0})], InfluenceLimits())
    assert nothing.client("z").scale == 1.0 and nothing.norm_bound == math.inf


def test_keys_held_by_too_few_clients_are_left_unchanged() -> None:
    global_state = {**GLOBAL, DEEP: torch.full((4, 16), 0.5)}
    shallow = [Stored(f"s{i}", 40, honest(i)) for i in range(2)]
    deep = Stored("deep", 40, {**honest(5), DEEP: torch.ones(4, 16)})
    new, influence = aggregate_round(FedAvg(), global_state, [*shallow, deep], InfluenceLimits(min_holders=2))
    assert influence.skipped_keys == (DEEP,)
    assert torch.equal(new[DEEP], global_state[DEEP])  # one holder: not that client's alone to set
    assert not torch.equal(new[A], global_state[A])  # three holders: averaged
    new1, _ = aggregate_round(FedAvg(), global_state, [*shallow, deep], InfluenceLimits(clip=math.inf, min_holders=1))
    assert torch.allclose(new1[DEEP], torch.full((4, 16), 1.5))


def test_a_deeper_tier_is_not_clipped_for_holding_more_layers() -> None:
    # Same per-key norms, three times the keys: the overall bound grows with sqrt(keys).
    layer = lambda i: {k.replace("layers.0", f"layers.{i}"): v for k, v in honest(0).items()}  # noqa: E731
    shallow = [Stored(f"s{i}", 40, layer(0)) for i in range(2)]
    deep = Stored("deep", 40, {**layer(0), **layer(1), **layer(2)})
    _, influence = aggregate_round(FedAvg(), GLOBAL, [*shallow, deep], InfluenceLimits(clip=1.5))
    assert influence.client("deep").scale == 1.0 and not influence.client("deep").key_scales


def test_bounded_delta_copies_only_what_it_scales() -> None:
    delta = honest(0)
    influence = bound_round([UpdateStats("a", 1, 1.0, {A: 0.5, B: 0.5})], InfluenceLimits()).client("a")
    out = bounded_delta(delta, influence, skipped_keys=[B])
    assert set(out) == {A} and out[A] is delta[A]
    half = bounded_delta(delta, type(influence)("a", 1, 1, 1.0, 0.5, {B: 0.25}))
    assert torch.allclose(half[A], delta[A] * 0.5) and torch.allclose(half[B], delta[B] * 0.25)
    assert half[B].dtype == delta[B].dtype


def test_round_influence_round_trips_through_json_with_infinite_bounds() -> None:
    import json

    stats = [UpdateStats("a", 10, 1.0, {A: 1.0}), UpdateStats("b", 90, 50.0, {A: 30.0, B: 40.0})]
    for limits in (InfluenceLimits(), OFF, InfluenceLimits(weight_cap=3.0, clip=math.inf, min_holders=2)):
        influence = bound_round(stats, limits)
        text = json.dumps(influence.to_json())  # strict JSON: no Infinity literals
        assert "Infinity" not in text
        assert RoundInfluence.from_json(json.loads(text)) == influence


def test_every_update_is_read_once_and_streamed() -> None:
    updates = [Stored(f"h{i}", 40, honest(i)) for i in range(5)]
    aggregate_round(FedAvg(), GLOBAL, updates, InfluenceLimits())
    assert [u.loads for u in updates] == [1] * 5


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 10**6), st.floats(1e-6, 1e4), st.floats(0.0, 1.0)), min_size=1, max_size=12
    ),
    st.floats(1.0, 5.0),
    st.floats(1.0, 5.0),
)
def test_no_client_exceeds_the_bounds(rows: list[tuple[int, float, float]], cap: float, clip: float) -> None:
    stats = [
        UpdateStats(f"c{i}", float(w), n, {A: n * math.sqrt(f), B: n * math.sqrt(1 - f)}) for i, (w, n, f) in enumerate(rows)
    ]
    influence = bound_round(stats, InfluenceLimits(weight_cap=cap, clip=clip, clip_per_key=True))
    med_w = statistics.median_low(s.weight for s in stats)
    med_n = statistics.median_low(s.norm / math.sqrt(2) for s in stats)  # every client holds 2 keys
    for s, c in zip(stats, influence.clients, strict=True):
        assert c.weight <= cap * med_w * (1 + 1e-12) and c.weight <= s.weight
        assert c.scale * s.norm / math.sqrt(2) <= clip * med_n * (1 + 1e-9)
        for key, n in s.key_norms.items():
            moved = [x.key_norms[key] for x in stats if x.key_norms[key] > 0]
            key_med = statistics.median_low(moved) if moved else math.inf
            assert c.factor(key) * n <= clip * key_med * (1 + 1e-9) or n == 0
            assert c.factor(key) <= c.scale


# ------------------------------------------------------------------ robust strategies


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_median_and_trimmed_mean_ignore_a_minority_of_outliers() -> None:
    deltas = [(40, {A: t(1.0, -1.0)}), (40, {A: t(1.2, -0.8)}), (40, {A: t(0.8, -1.2)}), (10**6, {A: t(1e6, -1e6)})]
    med = CoordinateMedian().aggregate({A: t(0.0, 0.0)}, deltas)
    assert torch.allclose(med[A], t(1.1, -1.1))  # even count: the mean of the two middle values
    trimmed = TrimmedMean(trim_ratio=0.2).aggregate({A: t(0.0, 0.0)}, deltas)
    assert torch.allclose(trimmed[A], t(1.1, -1.1))  # ceil(0.2 x 4) = 1 dropped at each end
    plain = FedAvg().aggregate({A: t(0.0, 0.0)}, deltas)
    assert float(plain[A][0]) > 1e5


def test_order_statistics_work_per_key_over_its_holders_and_keep_dtypes() -> None:
    g = {A: t(0.5).to(torch.bfloat16)}
    deltas = [(1, {A: t(1.0).to(torch.bfloat16), DEEP: t(4.0)}), (1, {A: t(3.0).to(torch.bfloat16)}), (1, {A: t(2.0).to(torch.bfloat16)})]
    out = CoordinateMedian().aggregate(g, deltas)
    assert out[A].dtype == torch.bfloat16 and float(out[A][0]) == 2.5
    assert float(out[DEEP][0]) == 4.0  # the only holder of a new key: its own value
    assert TrimmedMean().trimmed(1) == 0 and TrimmedMean().trimmed(3) == 1 and TrimmedMean().trimmed(10) == 2


def test_order_statistics_refuse_bad_updates() -> None:
    with pytest.raises(UpdateRejectedError, match="shape"):
        CoordinateMedian().aggregate({A: t(0.0, 0.0)}, [(1, {A: t(1.0)})])
    with pytest.raises(UpdateRejectedError, match="weight"):
        TrimmedMean().aggregate({}, [(0, {A: t(1.0)})])
    with pytest.raises(ConfigError, match="trim_ratio"):
        TrimmedMean(trim_ratio=0.5)


def test_strategies_are_selectable_by_name() -> None:
    assert {"fedavg", "median", "trimmed_mean"} <= set(available_strategies())
    settings_ = AggregationSettings(strategy="trimmed_mean", trim_ratio=0.1)
    strategy = get_strategy(settings_.strategy, **settings_.strategy_options())
    assert isinstance(strategy, TrimmedMean) and strategy.trim_ratio == 0.1


# ------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"weight_cap": 0.5}, "weight_cap must be a number >= 1"),
        ({"clip": -1.0}, "clip must be a number >= 1"),
        ({"min_holders": 0}, "min_holders must be an int >= 1"),
        ({"trim_ratio": 0.5}, r"trim_ratio must be in \[0, 0.5\)"),
    ],
)
def test_bad_aggregation_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AggregationSettings(**kwargs)  # type: ignore[arg-type]


def test_aggregation_settings_load_from_toml_with_inf(tmp_path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[aggregation]\nstrategy = "median"\nweight_cap = inf\nclip = 3.0\nmin_holders = 2\n')
    config = load_config(RunConfig, path, env={})
    assert config.aggregation.weight_cap == math.inf and config.aggregation.clip == 3.0
    assert config.aggregation.min_holders == 2 and config.aggregation.strategy == "median"
