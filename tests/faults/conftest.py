"""Fixtures of the fault-injection suite: a private mosquitto per test and a run sized for faults.

Each test gets its own broker (it may kill it) and a :class:`benchmarks.harness.Federation` over
the 4-layer cut of SmolLM2 (``tiny_model_dir``, shared by the whole session), packaged whole
in 4 bits (``fedpetuning``: no SGP or ODA to pay for), one training step of 16 tokens a
round, no evaluation: a round costs seconds, so the time goes into the faults.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from benchmarks.harness import Federation, light_settings


@pytest.fixture
def federation(tmp_path, broker_factory, tiny_model_dir, unique_id) -> Iterator[Callable[..., Federation]]:
    """``federation(["a", "b"], rounds={...}, ...)``: a run of real processes on a private mosquitto.

    Keyword arguments are config sections merged over :func:`benchmarks.harness.light_settings`.
    Every process is killed when the test ends.
    """
    made: list[Federation] = []

    def make(clients: list[str], **sections: Mapping[str, Any]) -> Federation:
        broker = broker_factory("mosquitto")
        settings = light_settings(unique_id("fault"), tiny_model_dir, broker.port, **sections)
        fed = Federation.create(tmp_path, broker, settings, clients)
        made.append(fed)
        return fed

    yield make
    for fed in made:
        fed.procs.kill_all()
