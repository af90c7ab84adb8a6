"""Starting, stopping, killing and restarting the brokers."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from shared import topics
from shared.broker import BrokerHandle, port_open
from shared.errors import BrokerError
from shared.transport import ConnectionEvent
from tests.shared.helpers import connect, wait_connected, wait_for, wait_message

REPO = Path(__file__).resolve().parents[2]


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


def test_killed_embedded_broker_comes_back_on_the_same_port(
    broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]
) -> None:
    broker = broker_factory("embedded")
    port = broker.port
    client = connect(broker, unique_id("edge"), persistent=False)
    try:
        topic = topics.assign(unique_id("run"), "edge")
        client.subscribe(topic)
        broker.kill()
        assert not broker.is_running and not port_open(broker.host, port)
        wait_for(client, lambda e: isinstance(e, ConnectionEvent) and not e.connected)
        broker.start()
        assert broker.port == port
        wait_connected(client)
        client.publish(topic, b"back")
        assert wait_message(client, topic).payload == b"back"
    finally:
        client.close()


def test_embedded_broker_exits_when_its_parent_dies() -> None:
    script = (
        "from shared.broker import start_embedded_broker\n"
        "b = start_embedded_broker()\n"
        "print(b.pid, b.port, flush=True)\n"
        "import sys; sys.stdin.read()\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        pid, port = map(int, parent.stdout.readline().split())
        child = psutil.Process(pid)
        assert child.is_running() and port_open("127.0.0.1", port)
        parent.kill()  # no cleanup runs in the parent
        parent.wait(10)
        child.wait(timeout=10)  # psutil raises TimeoutExpired if the broker outlives its parent
        assert not port_open("127.0.0.1", port)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_bad_mosquitto_config_reports_the_log(broker_factory: Callable[..., BrokerHandle]) -> None:
    with pytest.raises(BrokerError, match=r"exited with code.*Unknown configuration variable"):
        broker_factory("mosquitto", extra_config="this_is_not_an_option 1")


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
