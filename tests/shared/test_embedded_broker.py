"""The embedded broker: a killed one comes back on its port; it never outlives its parent; loopback only."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from shared import topics
from shared.broker import BrokerHandle, port_open
from shared.embedded_broker import (
    is_loopback_host,
    rumqttd_config,
    start_embedded_broker,
)
from shared.errors import BrokerError
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


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
     ("0.0.0.0", False), ("::", False), ("192.168.1.10", False), ("coordinator.example", False), ("", False)],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


def test_the_embedded_broker_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match=r"refusing to listen on '0\.0\.0\.0'.*mosquitto.*credentials"):
        start_embedded_broker(host="0.0.0.0", workdir=tmp_path)
    assert not (tmp_path / "broker.log").exists()  # refused before any process started
    result = subprocess.run(
        [sys.executable, "-m", "shared.embedded_broker", "--host", "0.0.0.0", "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "loopback only" in result.stderr and "mosquitto" in result.stderr


def test_rumqttd_listens_on_a_socket_address() -> None:
    assert 'listen = "127.0.0.1:1883"' in rumqttd_config("localhost", 1883, max_payload_bytes=1, mqtt_version=5)
    assert 'listen = "[::1]:1883"' in rumqttd_config("::1", 1883, max_payload_bytes=1, mqtt_version=5)
