"""``fedsoda-coordinator serve --broker-mode mosquitto`` with TLS, as a user runs it, attacked by an enrolled client.

A real ``serve`` process (the 4-layer cut of SmolLM2, one tier, one round) starts its own
mosquitto on the credentials folder. Alice joins with her credentials file over TLS; mallory,
enrolled while the broker runs (``credentials add`` reloads it), sniffs for alice's traffic
and then publishes an update as alice during alice's round: the broker answers PUBACK 0x87
and the round aggregates alice's own update only. ``credentials revoke mallory`` then cuts
her live connection, and neither she nor ``fedsoda-client join --credentials`` with her file
gets back in. Every wait is bounded and driven by progress.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from edge_client.cli import app as client_app
from hardware_profiles.detect import detect_profile
from shared import codec, topics
from shared.broker import free_port, port_open
from shared.credentials import ClientCredentials, load_client_credentials
from shared.errors import BrokerError
from shared.protocol import (
    GlobalAdapter,
    Hello,
    MessageType,
    Presence,
    ResourceReport,
    Update,
)
from shared.signing import SigningKey
from shared.tensors import payloads_digest, state_to_payloads
from shared.transport import MqttTransport
from shared.transport_types import InboundMessage, TransportConfig

runner = CliRunner()
TIMEOUT = 90.0


# The CLI configures root logging for a terminal; the fixture puts it back for the tests that follow.
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("restore_logging")]


def _config(path: Path, run_id: str, model_dir: Path, port: int, store: Path, pki: Path) -> Path:
    path.write_text(f"""
run_id = "{run_id}"
method = "fedpetuning"

[model]
model = "{model_dir}"

[pruning]
precision = "bf16"

[rounds]
rounds = 1
min_clients = 1
quorum = 1
round_timeout_s = 120.0

[evaluation]
enabled = false

[broker]
mode = "mosquitto"
host = "127.0.0.1"
port = {port}
credentials_dir = "{store}"
server_cert_file = "{pki / 'server.pem'}"
server_key_file = "{pki / 'server.key'}"
""")
    return path


def _add(client: str, port: int, store: Path, pki: Path, out: Path) -> tuple[ClientCredentials, str]:
    result = runner.invoke(coordinator_app, ["credentials", "add", client, "--broker", f"127.0.0.1:{port}",
                                             "--ca-file", str(pki / "ca.pem"), "--dir", str(store), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return load_client_credentials(out), result.output


def _transport(creds: ClientCredentials, folder: Path, **settings: object) -> MqttTransport:
    host, port = creds.broker.rsplit(":", 1)
    config = TransportConfig(host, int(port), client_id=creds.client_id, username=creds.username, password=creds.password,
                             ca_file=creds.ca_file(folder / creds.client_id), connect_timeout=10.0, **settings)  # type: ignore[arg-type]
    return MqttTransport(config).connect()


class Inbox:
    """Every message a transport receives, polled with deadlines."""

    def __init__(self, transport: MqttTransport, serve: subprocess.Popen, log: Path) -> None:
        self.transport, self.serve, self.log = transport, serve, log
        self.messages: list[InboundMessage] = []

    def wait(self, topic: str, accept: Callable[[object], bool] = lambda _b: True, timeout: float = TIMEOUT):
        """The body of the first message on ``topic`` (seen before or arriving now) that ``accept``s."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for message in self.messages[seen:]:
                seen += 1
                if message.topic == topic:
                    body = codec.decode_message(message.topic, message.payload, run=topics.parse(topic).run)[1].body
                    if accept(body):
                        return body
            event = self.transport.poll(0.2)
            if isinstance(event, InboundMessage):
                self.messages.append(event)
            if self.serve.poll() is not None:
                raise AssertionError(f"serve exited ({self.serve.returncode}):\n{self.log.read_text()[-4000:]}")
        raise AssertionError(f"nothing on {topic} within {timeout:.0f} s:\n{self.log.read_text()[-4000:]}")


def _update(run: str, client: str, base: GlobalAdapter, value: float, examples: int, loss: float, signer: SigningKey) -> bytes:
    delta = {key: torch.full(tuple(t.shape), value) for key, t in base.tensors.items()}
    resources = ResourceReport(peak_rss_bytes=1, peak_gpu_bytes=0, wall_seconds=1.0, cpu_seconds=1.0,
                               bytes_sent=0, bytes_received=0, device_class="unknown")
    body = Update(client_id=client, round=1, num_examples=examples, delta=state_to_payloads(delta),
                  metrics={"loss": loss}, resources=resources,
                  base_round=base.round, base_digest=payloads_digest(base.tensors))
    return codec.encode(MessageType.UPDATE, body, run=run, round=1, sender=client, signer=signer)


def test_serve_with_local_mosquitto_tls_acl_and_revocation(tmp_path, tiny_model_dir, pki, unique_id) -> None:
    run = unique_id("sec")
    store = tmp_path / "credentials"
    port = free_port()
    alice, _ = _add("alice", port, store, pki, tmp_path / "alice.toml")
    config = _config(tmp_path / "run.toml", run, tiny_model_dir, port, store, pki)
    log = tmp_path / "serve.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with log.open("w") as fh:
        serve = subprocess.Popen([sys.executable, "-m", "coordinator", "serve", "--config", str(config),
                                  "--run-dir", str(tmp_path / "run")], stdout=fh, stderr=subprocess.STDOUT, env=env)
    transports: list[MqttTransport] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        # serve notes the broker (for `add` to signal) just after the port opens, then says so.
        while not (port_open("127.0.0.1", port) and "mosquitto listening on" in log.read_text()):
            assert serve.poll() is None and time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.1)  # waiting for another process to listen; bounded by the deadline

        # Enrolled while the broker runs: `add` makes it reload, so mallory gets in at once.
        mallory, added = _add("mallory", port, store, pki, tmp_path / "mallory.toml")
        assert "it reloads its password file and ACL" in added
        a = _transport(alice, tmp_path)
        m = _transport(mallory, tmp_path)
        transports += [a, m]
        inbox_a, inbox_m = Inbox(a, serve, log), Inbox(m, serve, log)
        for topic_filter in (topics.schedule(run), topics.manifest(run, "+"), topics.adapter(run),
                             topics.assign(run, "alice"), topics.nack(run, "alice")):
            a.subscribe(topic_filter)
        # Mallory listens to the whole run; the broker grants it and delivers only what she may read.
        m.subscribe(f"{topics.run_prefix(run)}/#")

        adapter = inbox_a.wait(topics.adapter(run))  # retained: the coordinator is subscribed and serving
        profile = detect_profile()
        # Each signs with the key its credentials file carries: the coordinator pinned it from the registry.
        keys = {c.client_id: SigningKey.from_private_text(c.client_key) for c in (alice, mallory)}
        for who, transport, examples in (("alice", a, 7), ("mallory", m, 5)):
            presence = Presence(client_id=who, online=True, reason="joined")
            transport.publish(topics.presence(run, who), codec.encode(MessageType.PRESENCE, presence, run=run, round=-1, sender=who,
                                                                      signer=keys[who]), retain=True)
            hello = Hello(client_id=who, profile=profile, num_examples=examples, software_version="test", public_key=keys[who].public.text)
            transport.publish(topics.hello(run, who), codec.encode(MessageType.HELLO, hello, run=run, round=-1, sender=who, signer=keys[who]))
            inbox = inbox_a if who == "alice" else inbox_m
            assert inbox.wait(topics.assign(run, who)).accepted
        # Alice's assignment went out before mallory's, on the same connection: nothing of
        # alice's reached mallory before her own assignment did.
        assert not [msg.topic for msg in inbox_m.messages if msg.topic.endswith("/alice")]
        inbox_a.wait(topics.schedule(run), lambda s: s.status == "running" and "alice" in s.participants)

        # Mallory publishes an update as alice (raw paho: MQTT v5, QoS 1, her own login and TLS).
        m.close()
        acks: queue.SimpleQueue = queue.SimpleQueue()
        drops: queue.SimpleQueue = queue.SimpleQueue()
        raw = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mallory", protocol=mqtt.MQTTv5)
        raw.username_pw_set(mallory.username, mallory.password)
        raw.tls_set(ca_certs=str(tmp_path / "mallory" / "broker-ca.pem"))
        raw.on_publish = lambda _c, _u, mid, rc, _p: acks.put((mid, rc.value))
        raw.on_disconnect = lambda _c, _u, _f, rc, _p: drops.put(str(rc))
        raw.connect("127.0.0.1", port)
        raw.loop_start()
        try:
            forged = raw.publish(topics.update(run, "alice"), _update(run, "alice", adapter, 0.1, 999, 666.0, keys["mallory"]), qos=1)
            assert acks.get(timeout=30) == (forged.mid, 0x87)

            # Revoked while connected: the broker reloads and cuts her off.
            result = runner.invoke(coordinator_app, ["credentials", "revoke", "mallory", "--dir", str(store)])
            assert result.exit_code == 0 and "it reloads" in result.output, result.output
            assert drops.get(timeout=30)
        finally:
            raw.loop_stop()
            raw.disconnect()
        with pytest.raises(BrokerError, match="Not authorized.*check the credentials"):
            _transport(mallory, tmp_path)
        data = tmp_path / "data.jsonl"
        data.write_text('{"text": "fine", "label": 1}\n')
        result = runner.invoke(client_app, ["join", "--credentials", str(tmp_path / "mallory.toml"), "--data", str(data),
                                            "--run", run, "--state-dir", str(tmp_path / "mallory-state")])
        assert result.exit_code == BrokerError.exit_code and "Not authorized" in result.output, result.output

        # Alice's own update closes the round; the run finishes.
        a.publish(topics.update(run, "alice"), _update(run, "alice", adapter, 0.001, 7, 1.0, keys["alice"]))
        assert a.flush(30)
        serve.wait(TIMEOUT)
        assert serve.returncode == 0, log.read_text()[-4000:]
    finally:
        for t in transports:
            t.close()
        if serve.poll() is None:
            serve.send_signal(2)  # SIGINT: serve stops its broker on the way out
            serve.wait(30)
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [(u["client_id"], u["num_examples"], u["metrics"]) for u in report["updates"]] == [("alice", 7, {"loss": 1.0})]
    assert report["refused"] == {}
    assert not (store / "broker.json").exists(), "serve forgets its broker when it stops"
