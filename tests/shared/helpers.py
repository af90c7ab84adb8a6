"""Helpers for broker tests: connected transports and queue-based waits (no bare sleeps)."""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.broker import BrokerHandle
from shared.transport import (
    ConnectionEvent,
    Event,
    InboundMessage,
    MqttTransport,
    TransportConfig,
    Will,
)


def connect(broker: BrokerHandle, client_id: str, *, will: Will | None = None, **overrides: object) -> MqttTransport:
    """A connected transport to ``broker`` with fast reconnects (``overrides`` win)."""
    settings: dict[str, object] = {
        "connect_timeout": 10.0,
        "reconnect_min_delay": 0.1,
        "reconnect_max_delay": 1.0,
        **overrides,
    }
    config = TransportConfig(host=broker.host, port=broker.port, client_id=client_id, **settings)  # type: ignore[arg-type]
    return MqttTransport(config, will=will).connect()


def wait_for(transport: MqttTransport, predicate: Callable[[Event], bool], timeout: float = 15.0) -> Event:
    """Poll (dispatching to handlers) until an event satisfies ``predicate``.

    Raises:
        AssertionError: Nothing matched within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = transport.poll(min(left, 0.5))
        if event is not None and predicate(event):
            return event
    raise AssertionError(f"no matching event on {transport.client_id} within {timeout} s")


def wait_message(transport: MqttTransport, topic: str, timeout: float = 15.0) -> InboundMessage:
    """The next message on ``topic``."""
    event = wait_for(transport, lambda e: isinstance(e, InboundMessage) and e.topic == topic, timeout)
    assert isinstance(event, InboundMessage)
    return event


def wait_connected(transport: MqttTransport, timeout: float = 20.0) -> ConnectionEvent:
    """The next (re)connect event."""
    event = wait_for(transport, lambda e: isinstance(e, ConnectionEvent) and e.connected, timeout)
    assert isinstance(event, ConnectionEvent)
    return event


def drain(transport: MqttTransport) -> list[Event]:
    """Take every event already queued."""
    events = []
    while (event := transport.poll(0)) is not None:
        events.append(event)
    return events
