"""The embedded broker: a killed one comes back on its port; it never outlives its parent."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from shared import topics
from shared.broker import BrokerHandle, port_open
from shared.transport_types import ConnectionEvent
from tests.shared.helpers import connect, wait_connected, wait_for, wait_message

REPO = Path(__file__).resolve().parents[2]


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
        "from shared.embedded_broker import start_embedded_broker\n"
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
