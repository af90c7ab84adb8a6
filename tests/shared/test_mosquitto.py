"""The local mosquitto: restarts keep its port and retained messages; a bad config shows its log."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shared import topics
from shared.broker import BrokerHandle
from shared.errors import BrokerError
from tests.shared.helpers import connect, wait_message


def test_mosquitto_restart_keeps_port_and_retained_messages(
    broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]
) -> None:
    broker = broker_factory("mosquitto")
    port = broker.port
    topic = topics.schedule(unique_id("run"))
    pub = connect(broker, unique_id("coord"))
    pub.publish(topic, b"round 3", retain=True)
    assert pub.flush(5)
    pub.close()
    old_pid = broker.pid
    broker.restart()
    assert broker.port == port and broker.pid != old_pid and broker.is_running
    late = connect(broker, unique_id("late"))
    try:
        late.subscribe(topic)
        msg = wait_message(late, topic)
        assert msg.payload == b"round 3" and msg.retain
    finally:
        late.close()


def test_bad_mosquitto_config_reports_the_log(broker_factory: Callable[..., BrokerHandle]) -> None:
    with pytest.raises(BrokerError, match=r"exited with code.*Unknown configuration variable"):
        broker_factory("mosquitto", extra_config="this_is_not_an_option 1")
