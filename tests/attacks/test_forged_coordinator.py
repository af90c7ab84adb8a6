"""A stranger on the broker speaks for the coordinator (issue #14): clients must not listen.

The embedded broker takes anyone, so a stranger can publish on the coordinator's topics,
retained messages included, with ``sender = "coordinator"``. Before protocol 1.3 that ended
every client (a forged ``finished`` schedule), froze them (a global adapter of round 10**9
makes every real one look stale) or stopped a download (a forged nack; now it would pause it). Now each is refused
as a :class:`~shared.errors.SignatureError` and the client carries on with the real run.

The client runs in a thread of this process against a scripted coordinator that signs with
its own key; a whole training run is covered by tests/integration.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge_client.cli import app as client_app
from edge_client.data import rows_from_records
from edge_client.runner import ClientOptions, EdgeClient
from shared import codec, topics
from shared.broker import BrokerHandle
from shared.errors import ConfigError
from shared.manifests import build_manifest
from shared.protocol import COORDINATOR_ID, GlobalAdapter, MessageType, Nack, Schedule
from shared.signing import SigningKey
from shared.tasks import TaskSpec
from shared.transport import MqttTransport
from shared.transport_types import InboundMessage, TransportConfig
from tests.shared.helpers import (
    connect,
    fetcher_for,
    folder_tree,
    serving,
    write_folder,
)
from tests.shared.samples import profile, training

WAIT = 30.0


def _schedule(round_: int, status: str) -> Schedule:
    return Schedule(round=round_, status=status, deadline=0.0, quorum=1, participants={}, training=training(),
                    manifests={}, adapter_round=0, task=TaskSpec())


def _send(transport: MqttTransport, topic: str, msg_type: MessageType, body: Any, run: str, *,
          signer: SigningKey | None, retain: bool = False, round_: int = -1) -> bytes:
    payload = codec.encode(msg_type, body, run=run, round=round_, sender=COORDINATOR_ID, signer=signer)
    transport.publish(topic, payload, qos=1, retain=retain)
    transport.flush()
    return payload


class ClientThread(threading.Thread):
    """An EdgeClient's ``run`` in a thread, keeping its outcome or exception."""

    def __init__(self, client: EdgeClient, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.client, self.stop_event = client, stop
        self.outcome: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.outcome = self.client.run(stop=self.stop_event.is_set)
        except BaseException as exc:  # reported by the test
            self.error = exc


def _until(condition: Callable[[], bool], what: str, worker: ClientThread) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert worker.error is None, f"the client raised while waiting for {what}: {worker.error!r}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # the client's own thread does the work; this only watches it


def _client(broker: BrokerHandle, run: str, client_id: str, key: SigningKey, state: Path) -> EdgeClient:
    rows = rows_from_records([{"text": "a fine film", "label": 1}], source="inline")
    config = TransportConfig(host=broker.host, port=broker.port, client_id=client_id)
    return EdgeClient(ClientOptions(run, client_id, state, coordinator_key=key.public), config, profile(), rows)


def test_forged_finished_schedule_adapter_and_nack_change_nothing_on_a_running_client(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client_id = unique_id("run"), unique_id("edge")
    key, stranger_key = SigningKey.generate(), SigningKey.generate()
    coordinator = connect(embedded_broker, unique_id("coordinator"))
    stranger = connect(embedded_broker, unique_id("mallory"))
    real_schedule = _schedule(1, "running")
    _send(coordinator, topics.schedule(run), MessageType.SCHEDULE, real_schedule, run, signer=key, retain=True, round_=1)
    real_adapter = GlobalAdapter(round=0, tensors={})
    _send(coordinator, topics.adapter(run), MessageType.GLOBAL_ADAPTER, real_adapter, run, signer=key, retain=True, round_=0)
    client = _client(embedded_broker, run, client_id, key, tmp_path / "state")
    stop = threading.Event()
    worker = ClientThread(client, stop)
    worker.start()
    try:
        _until(lambda: client.schedule == real_schedule and client.adapter == real_adapter, "the real retained state", worker)

        # 1. Unsigned, retained: the schedule that used to end every client.
        _send(stranger, topics.schedule(run), MessageType.SCHEDULE, _schedule(2, "finished"), run, signer=None, retain=True, round_=2)
        # 2. Signed, but by the stranger's own key: an adapter from the far future.
        _send(stranger, topics.adapter(run), MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=10**9, tensors={}), run,
              signer=stranger_key, retain=True, round_=10**9)
        # 3. Badly signed: a real signed nack (say, captured earlier) with its reason altered.
        genuine = codec.encode(MessageType.NACK, Nack(client_id, 1, "", "late", "round closed"), run=run, round=1,
                               sender=COORDINATOR_ID, signer=key)
        altered = genuine.replace(b"round closed", b"round CLOSED")
        stranger.publish(topics.nack(run, client_id), altered, qos=1)
        stranger.flush()

        _until(lambda: client.refused.get("SignatureError", 0) >= 3, "the three forgeries to be refused", worker)
        assert worker.is_alive(), f"the client ended on a forgery: {worker.outcome}"
        assert client.schedule == real_schedule and client.adapter == real_adapter
        assert list(client.nacks) == []

        # The real coordinator ends the run: that the client does act on.
        _send(coordinator, topics.schedule(run), MessageType.SCHEDULE, _schedule(1, "finished"), run, signer=key, retain=True, round_=1)
        worker.join(WAIT)
        assert not worker.is_alive() and worker.error is None, worker.error
    finally:
        stop.set()
        worker.join(WAIT)
        for topic in (topics.schedule(run), topics.adapter(run)):  # leave no retained messages on the session broker
            coordinator.publish(topic, b"", qos=1, retain=True)
        coordinator.flush()
        coordinator.close()
        stranger.close()
    assert worker.outcome.status == "finished" and worker.outcome.reason == "the run finished"
    assert worker.outcome.refused == {"SignatureError": 3}


def test_a_client_pinned_to_an_old_key_refuses_the_new_one_and_says_so(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="edge_client.runner")
    run, client_id = unique_id("run"), unique_id("edge")
    old, new = SigningKey.generate(), SigningKey.generate()
    coordinator = connect(embedded_broker, unique_id("coordinator"))
    client = _client(embedded_broker, run, client_id, old, tmp_path / "state")
    stop = threading.Event()
    worker = ClientThread(client, stop)
    worker.start()
    try:
        # A coordinator whose key was replaced: even its "finished" is refused by a client still pinning the old key.
        _send(coordinator, topics.schedule(run), MessageType.SCHEDULE, _schedule(1, "finished"), run, signer=new, retain=True, round_=1)
        _until(lambda: client.refused.get("SignatureError", 0) >= 1, "the refusal", worker)
        assert worker.is_alive() and client.schedule is None
    finally:
        stop.set()
        worker.join(WAIT)
        coordinator.publish(topics.schedule(run), b"", qos=1, retain=True)
        coordinator.flush()
        coordinator.close()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused message on")]
    assert any(f"pinned coordinator key {old.public.text}" in line and "pin its new coordinator.pub" in line for line in lines), lines


def test_a_forged_nack_no_longer_stops_a_download(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = write_folder(tmp_path / "src", {"weights.bin": os.urandom(64 * 1024)})
    manifest = build_manifest(src, "pkg", 1, "t", chunk_size=4096)
    stranger = connect(any_broker, unique_id("mallory"))
    forged_at: list[float] = []

    def forge_first(message: InboundMessage) -> None:
        # Answer the client's first chunk request before the coordinator does: "unknown_blob".
        if not forged_at:
            forged_at.append(time.monotonic())
            nack = Nack(client, -1, "", "unknown_blob", "forged: this blob is not served")
            stranger.publish(topics.nack(run, client), codec.encode(MessageType.NACK, nack, run=run, round=-1, sender=COORDINATOR_ID), qos=1)

    stranger.subscribe(topics.chunkreq(run, client), forge_first)
    pump = threading.Event()

    def pump_stranger() -> None:
        while not pump.is_set():
            stranger.poll(0.05)

    pumping = threading.Thread(target=pump_stranger, daemon=True)
    pumping.start()
    try:
        with serving(any_broker, run) as server:
            server.add(manifest, src)
            transport, fetcher = fetcher_for(any_broker, run, client, tmp_path / "cache", window=1)
            try:
                folder = fetcher.fetch(manifest, timeout=60)
            finally:
                transport.close()
    finally:
        pump.set()
        pumping.join(10)
        stranger.close()
    # Without signatures the forged nack would count as the coordinator's refusal and pause the
    # requests, as a genuine one does (tests/shared/test_blob_fetcher.py, refusals).
    assert forged_at, "the stranger never saw a chunk request, so it forged nothing"
    assert folder_tree(folder) == {"weights.bin": (src / "weights.bin").read_bytes()}
    assert fetcher.stats.fetched == len(manifest.files[0].chunks)
    assert fetcher.stats.refusals == 0


def test_join_without_a_pinned_coordinator_key_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    result = CliRunner().invoke(client_app, ["join", "--data", str(data), "--broker", "127.0.0.1:1", "--client-id", "c1",
                                             "--state-dir", str(tmp_path / "s")], env={"FEDSODA_COORDINATOR_KEY": ""})
    assert result.exit_code == ConfigError.exit_code, result.output
    said = " ".join(result.output.split())
    assert "no coordinator key is pinned" in said and "--coordinator-key" in said and "--credentials" in said
    assert not (tmp_path / "s").exists()  # refused before anything else happened


def test_join_pins_a_key_from_a_flag_or_the_pub_file(tmp_path: Path) -> None:
    # A well-pinned client gets past the key and fails on what comes next: nothing listens on port 1.
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    pub = tmp_path / "coordinator.pub"
    pub.write_text(SigningKey.generate().public.text + "\n")
    for pinned in (str(pub), pub.read_text().strip()):
        result = CliRunner().invoke(client_app, ["join", "--data", str(data), "--broker", "127.0.0.1:1", "--client-id", "c1",
                                                 "--state-dir", str(tmp_path / "s"), "--coordinator-key", pinned])
        assert result.exit_code == 5, result.output  # BrokerError: past the key check
    bad = CliRunner().invoke(client_app, ["join", "--data", str(data), "--coordinator-key", "ed25519:AAAA"])
    assert bad.exit_code == ConfigError.exit_code and "holds 3 bytes" in bad.output
