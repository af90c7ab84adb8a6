"""Broker handles: stopping either kind, and a client closing while its broker is down."""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.broker import BrokerHandle, port_open
from shared.transport_types import ConnectionEvent
from tests.shared.helpers import connect, wait_for


def test_stop_is_idempotent_and_releases_the_port(broker_factory: Callable[..., BrokerHandle]) -> None:
    for kind in ("mosquitto", "embedded"):
        broker = broker_factory(kind)
        broker.stop()
        broker.stop()
        assert not broker.is_running and not port_open(broker.host, broker.port)


def test_closing_a_client_while_the_broker_is_down_is_prompt(
    broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]
) -> None:
    broker = broker_factory("embedded")
    client = connect(broker, unique_id("edge"), reconnect_max_delay=30.0)
    broker.kill()
    wait_for(client, lambda e: isinstance(e, ConnectionEvent) and not e.connected)
    start = time.monotonic()
    client.close()
    assert time.monotonic() - start < 3
