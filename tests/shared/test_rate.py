"""The token bucket that meters chunk requests and hellos."""

from __future__ import annotations

import pytest

from coordinator.settings import ValidationSettings
from shared.errors import ConfigError
from shared.rate import TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_full_bucket_allows_a_burst_then_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=20.0, burst=5, clock=clock)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    clock.now += 0.125  # 2.5 tokens come back in 0.125 s at 20/s
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 3600  # never more than the burst, however long it rested
    assert sum(bucket.take() for _ in range(10)) == 5


def test_a_clock_going_back_adds_nothing() -> None:
    clock = Clock()
    bucket = TokenBucket(rate=1.0, burst=1, clock=clock)
    assert bucket.take()
    clock.now -= 50
    assert not bucket.take()


@pytest.mark.parametrize(("rate", "burst"), [(0, 5), (-1, 5), (1, 0.5)])
def test_impossible_buckets_are_refused(rate: float, burst: float) -> None:
    with pytest.raises(ValueError, match="rate > 0 and burst >= 1"):
        TokenBucket(rate, burst)


def test_the_hello_limit_is_validated_with_the_config() -> None:
    with pytest.raises(ConfigError, match="hellos_per_second must be > 0"):
        ValidationSettings(hellos_per_second=0)
    assert ValidationSettings().hello_burst >= 100  # a fleet starting together is not throttled
