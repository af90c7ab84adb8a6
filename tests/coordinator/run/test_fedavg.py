"""FedAvg over layer-mapped adapters: hand-computed results, partial holders, streaming."""

from __future__ import annotations

import gc
import math
import weakref
from collections.abc import Iterator

import pytest
import torch

from coordinator.run.aggregation import (
    AggregationStrategy,
    FedAvg,
    available_strategies,
    get_strategy,
    register_strategy,
)
from shared.errors import ConfigError, UpdateRejectedError


def key(layer: int, part: str) -> str:
    return f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_{part}.weight"


def t(*values: float, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    x = torch.tensor(values, dtype=torch.float32)
    return x.reshape(shape) if shape else x


def test_weighted_average_per_key_over_holders_by_hand() -> None:
    # Tier "small" holds layers 0 and 2; tier "big" holds 0, 1 and 2 (nested tiers).
    a0, b0, a1, b1, a2 = key(0, "A"), key(0, "B"), key(1, "A"), key(1, "B"), key(2, "A")
    global_state = {
        a0: t(1.0, 2.0, shape=(1, 2)),
        b0: t(0.5, -0.5, shape=(2, 1)),
        a1: t(10.0, 10.0, shape=(1, 2)),
        b1: t(0.0, 0.0, shape=(2, 1)),
        a2: t(3.0, 3.0, shape=(1, 2)),
    }
    before = {k: v.clone() for k, v in global_state.items()}
    small = (1, {a0: t(4.0, 8.0, shape=(1, 2)), b0: t(1.0, 1.0, shape=(2, 1)), a2: t(2.0, 0.0, shape=(1, 2))})
    big = (
        3,
        {
            a0: t(0.0, 4.0, shape=(1, 2)),
            b0: t(-1.0, 3.0, shape=(2, 1)),
            a1: t(2.0, -2.0, shape=(1, 2)),
            b1: t(6.0, 3.0, shape=(2, 1)),
            a2: t(-2.0, 4.0, shape=(1, 2)),
        },
    )
    out = FedAvg().aggregate(global_state, iter([small, big]))

    # Layers 0 and 2: both clients hold them -> weights 1/4 and 3/4.
    assert torch.equal(out[a0], t(1 + (4 + 0) / 4, 2 + (8 + 12) / 4, shape=(1, 2)))
    assert torch.equal(out[b0], t(0.5 + (1 - 3) / 4, -0.5 + (1 + 9) / 4, shape=(2, 1)))
    assert torch.equal(out[a2], t(3 + (2 - 6) / 4, 3 + (0 + 12) / 4, shape=(1, 2)))
    # Layer 1: only the big tier holds it -> its delta counts in full, not diluted by n=1.
    assert torch.equal(out[a1], t(12.0, 8.0, shape=(1, 2)))
    assert torch.equal(out[b1], t(6.0, 3.0, shape=(2, 1)))
    # LoRA A and B are averaged separately: B is the mean of the Bs, not derived from A @ B.
    for k in global_state:
        assert torch.equal(global_state[k], before[k]), "the input global state must not change"
        assert out[k].data_ptr() != global_state[k].data_ptr()


def test_key_nobody_held_is_kept_and_new_key_starts_from_zero() -> None:
    old, new = key(0, "A"), key(5, "A")
    global_state = {old: t(1.0, 1.0)}
    out = FedAvg().aggregate(global_state, [(2, {new: t(3.0, 6.0)}), (6, {new: t(1.0, 2.0)})])
    assert torch.equal(out[old], t(1.0, 1.0))
    assert torch.equal(out[new], t((2 * 3 + 6 * 1) / 8, (2 * 6 + 6 * 2) / 8))
    assert set(out) == {old, new}


def test_accumulates_in_float32_and_keeps_global_dtype() -> None:
    k16, kbf = key(0, "A"), key(0, "B")
    global_state = {k16: torch.zeros(3, dtype=torch.float16), kbf: torch.ones(2, dtype=torch.bfloat16)}
    # 3 * 60000 overflows float16 (max 65504); the float32 sum does not.
    d1 = {k16: torch.full((3,), 60000.0, dtype=torch.float16), kbf: torch.full((2,), 2.0, dtype=torch.bfloat16)}
    d2 = {k16: torch.full((3,), 30000.0, dtype=torch.float16), kbf: torch.zeros(2, dtype=torch.bfloat16)}
    out = FedAvg().aggregate(global_state, [(3, d1), (3, d2)])
    assert out[k16].dtype == torch.float16 and out[kbf].dtype == torch.bfloat16
    assert torch.equal(out[k16], torch.full((3,), 45000.0, dtype=torch.float16))
    assert torch.equal(out[kbf], torch.full((2,), 2.0, dtype=torch.bfloat16))


def test_new_key_takes_the_dtype_of_its_first_delta() -> None:
    k = key(3, "B")
    out = FedAvg().aggregate({}, [(1, {k: torch.ones(2, dtype=torch.bfloat16)})])
    assert out[k].dtype == torch.bfloat16


def test_no_updates_returns_an_unchanged_copy() -> None:
    g = {key(0, "A"): t(1.0, 2.0)}
    out = FedAvg().aggregate(g, [])
    assert torch.equal(out[key(0, "A")], g[key(0, "A")])
    assert out[key(0, "A")] is not g[key(0, "A")]


@pytest.mark.parametrize("weight", [0, -3, True, math.nan, math.inf, "3"])
def test_bad_weight_is_rejected(weight: object) -> None:
    with pytest.raises(UpdateRejectedError, match="update 0 has weight"):
        FedAvg().aggregate({}, [(weight, {key(0, "A"): t(1.0)})])  # type: ignore[list-item]


def test_capped_weights_may_be_fractional() -> None:
    # The influence bounds cap a weight at k x the median, which need not be a whole number.
    k = key(0, "A")
    out = FedAvg().aggregate({k: t(0.0)}, [(2.5, {k: t(1.0)}), (7.5, {k: t(5.0)})])
    assert torch.allclose(out[k], t(4.0))


def test_shape_disagreements_are_rejected() -> None:
    k = key(0, "A")
    with pytest.raises(UpdateRejectedError, match=r"shape \(3,\), expected \(2,\)"):
        FedAvg().aggregate({k: t(0.0, 0.0)}, [(1, {k: t(1.0, 2.0, 3.0)})])
    new = key(9, "A")
    with pytest.raises(UpdateRejectedError, match="update 1"):
        FedAvg().aggregate({}, [(1, {new: t(1.0, 2.0)}), (1, {new: t(1.0)})])


def test_streaming_holds_no_per_client_tensors() -> None:
    """1,000 deltas from a generator: each must be freed before the next one is produced."""
    k_a, k_b = key(0, "A"), key(0, "B")
    global_state = {k_a: torch.zeros(64, 64), k_b: torch.zeros(64, 64)}
    refs: list[weakref.ref[torch.Tensor]] = []
    alive_when_pulled: list[int] = []

    def deltas() -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        for i in range(1000):
            gc.collect() if i % 250 == 0 else None
            alive_when_pulled.append(sum(r() is not None for r in refs))
            a = torch.full((64, 64), float(i))
            b = torch.full((64, 64), float(-i))
            refs.append(weakref.ref(a))
            refs.append(weakref.ref(b))
            yield 1, {k_a: a, k_b: b}
            del a, b

    strategy = FedAvg()
    out = strategy.aggregate(global_state, deltas())
    assert max(alive_when_pulled) == 0, "the strategy kept a client's tensors while pulling the next"
    assert all(r() is None for r in refs)
    assert torch.allclose(out[k_a], torch.full((64, 64), 499.5))
    assert torch.allclose(out[k_b], torch.full((64, 64), -499.5))
    assert not any(isinstance(v, torch.Tensor) for v in vars(strategy).values())


def test_registry_selects_by_name() -> None:
    assert "fedavg" in available_strategies()
    assert isinstance(get_strategy("fedavg"), FedAvg)
    assert isinstance(get_strategy("FedAvg"), FedAvg)
    with pytest.raises(ConfigError, match="unknown aggregation strategy 'fedmedian'.*fedavg"):
        get_strategy("fedmedian")


def test_registering_a_taken_name_fails_and_abc_is_abstract() -> None:
    class Other(AggregationStrategy):
        name = "fedavg"

        def aggregate(self, global_state, updates):  # type: ignore[no-untyped-def]
            return dict(global_state)

    with pytest.raises(ValueError, match="registered twice"):
        register_strategy(Other)
    assert register_strategy(FedAvg) is FedAvg
    with pytest.raises(TypeError):
        AggregationStrategy()  # type: ignore[abstract]
