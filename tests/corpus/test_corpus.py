"""The hostile-message corpus against a live coordinator and a live client, over real mosquitto.

One run of the real ``CoordinatorServer`` and ``EdgeClient`` (threads of this process, so a
failing test can stop them; the 4-layer SmolLM2 cut, one short round) on a private
mosquitto. The test plays a third, scripted client, ``probe``: it says hello so that round 1
assigns it (updates from it reach content validation), then publishes every corpus message
on its topic, checks that each one was refused with its reason and detail and counted, and
finally sends a good update that must be averaged into round 1's global adapter. Along the
way it also slips a corrupt chunk into the client's real download: refused, and the chunk is
fetched from the coordinator instead. The coordinator signs with the corpus key
(``make_corpus.CORPUS_KEY``) and the client pins it, so the client-bound messages signed with
it reach the checks behind the signature, and the unsigned or wrongly signed ones are refused
as forgeries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from coordinator.model.pipeline import ModelPipeline
from coordinator.run.checkpoint import RunDir
from coordinator.run.server import CoordinatorServer
from coordinator.settings import RunConfig
from edge_client.data import load_rows
from edge_client.runner import ClientEvents, ClientOptions, EdgeClient
from hardware_profiles.detect import detect_profile
from shared import codec, topics
from shared.chunkstore import ChunkStore, materialize, resolve_inside
from shared.config import load_config
from shared.errors import UnsafePathError
from shared.manifests import chunk_lengths, compute_blob_id
from shared.protocol import (
    COORDINATOR_ID,
    Chunk,
    FileEntry,
    Hello,
    Manifest,
    MessageType,
    ResourceReport,
    Update,
)
from shared.tensors import payloads_digest, state_to_payloads
from shared.transport import MqttTransport
from shared.transport_types import InboundMessage, TransportConfig
from tests.corpus import make_corpus
from tests.corpus.make_corpus import (
    CLIENT,
    INDEX_FILE,
    MESSAGES_DIR,
    PROBE,
    ROUND,
    RUN,
    TIER,
)

OLD_CLIENT = "old-probe"
"""A client that speaks protocol 1.0 (it says hello, and is refused)."""

LIVE_TIMEOUT = 240.0
"""Upper bound of every wait in the live test (it takes well under 90 s on 2 loaded cores)."""

CATEGORIES = {
    "truncated", "garbage", "huge-length", "deep-nesting", "wrong-type", "unknown-type", "version", "tensor",
    "nan-inf", "shape-keys", "norm", "chunk-hash", "path", "sender", "stale", "inconsistent", "signature",
}


def _index() -> dict[str, Any]:
    return json.loads(INDEX_FILE.read_text())


def test_committed_corpus_is_what_the_generator_writes() -> None:
    entries = make_corpus.build()
    regenerate = "regenerate it: .venv/bin/python -m tests.corpus.make_corpus"
    assert INDEX_FILE.read_text() == make_corpus.index_json(entries), f"index.json is stale; {regenerate}"
    assert sorted(p.name for p in MESSAGES_DIR.glob("*.bin")) == sorted(f"{e.name}.bin" for e in entries), regenerate
    for entry in entries:
        assert (MESSAGES_DIR / f"{entry.name}.bin").read_bytes() == entry.payload, f"{entry.name} is stale; {regenerate}"


def test_corpus_covers_every_category_for_both_processes() -> None:
    entries = _index()["entries"]
    assert len(entries) >= 50
    assert {e["category"] for e in entries} == CATEGORIES
    assert {e["target"] for e in entries} == {"coordinator", "client"}
    assert len({e["file"] for e in entries}) == len(entries)


def test_symlinks_never_let_a_package_write_outside_its_folder(tmp_path: Path) -> None:
    # The wire has no symlink entries and packages are built in a fresh folder, so a link can
    # only be one a local user left: the package folder itself, or a folder inside the build.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("precious")
    store = ChunkStore(tmp_path / "cache")
    data = b"layer weights"
    digest = hashlib.sha256(data).hexdigest()
    store.put(digest, data)
    files = [FileEntry(path="model/weights.bin", size=len(data), chunks=[digest])]
    manifest = Manifest(compute_blob_id(files, 64), "m", 1, "t", 64, files, {})
    dest = tmp_path / "packages" / manifest.blob_id
    dest.parent.mkdir()
    dest.symlink_to(outside, target_is_directory=True)  # the package folder is a link to elsewhere
    materialize(manifest, store, dest)
    assert not dest.is_symlink() and (dest / "model" / "weights.bin").read_bytes() == data
    assert sorted(p.name for p in outside.iterdir()) == ["keep.txt"]  # replaced, not written through
    build = tmp_path / "build"
    build.mkdir()
    (build / "model").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="resolves outside"):
        resolve_inside(build, "model/weights.bin")


# --------------------------------------------------------------------------- the live run


def _config(path: Path, model_dir: Path, port: int) -> RunConfig:
    key_file = path.parent / "corpus-coordinator.key"  # the coordinator signs with the corpus key
    key_file.write_bytes(Ed25519PrivateKey.from_private_bytes(make_corpus.CORPUS_SIGNING_SEED).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_file.chmod(0o600)
    path.write_text(f"""
run_id = "{RUN}"
seed = 1
method = "fedsoda"

[model]
model = "{model_dir}"
public_data = "wikipedia"
calibration_samples = 4
calibration_seq_len = 16

[pruning]
depths = [2]

[alignment]
pre_align_steps = 0
realign_steps = 0
batch_size = 2

[rounds]
rounds = 1
min_clients = 2
quorum = 2
round_timeout_s = {LIVE_TIMEOUT}
realign_every = 0

[training]
local_steps = 1
learning_rate = 0.002
batch_size = 2
seq_len = 16
lora_rank = {make_corpus.RANK}
lora_alpha = 8.0
lora_dropout = 0.0
target_modules = ["q_proj", "v_proj"]
mu = 0.01
seed = 0

[evaluation]
enabled = false

[broker]
host = "127.0.0.1"
port = {port}
signing_key = "{key_file}"
""")
    return load_config(RunConfig, path, env={})


class Worker(threading.Thread):
    """A thread that keeps its target's result or exception."""

    def __init__(self, name: str, target: Callable[[], Any]) -> None:
        super().__init__(name=name, daemon=True)
        self._target_fn = target
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self._target_fn()
        except BaseException as exc:  # reported by the test, which fails on it
            self.error = exc


class Tester:
    """The test's own MQTT connection: watches the run, plays ``probe``, sends the corpus.

    It stops recording the run's state (``watching = False``) before it sends the corpus, whose
    messages arrive on the same topics.
    """

    __test__ = False  # not a test class

    def __init__(self, port: int) -> None:
        self.transport = MqttTransport(TransportConfig(host="127.0.0.1", port=port, client_id="corpus-tester")).connect()
        self.latest: dict[str, Any] = {}
        self.watching = True
        self.chunk_requests: list[list[str]] = []
        for topic in (topics.schedule(RUN), topics.adapter(RUN), topics.manifest(RUN, TIER), topics.assign(RUN, PROBE)):
            self.transport.subscribe(topic, self._keep)
        self.transport.subscribe(topics.assign(RUN, OLD_CLIENT), self._keep_old)

    def _keep_old(self, message: InboundMessage) -> None:
        self.latest["old_assignment"] = codec.decode_message(message.topic, message.payload, run=RUN)[1].body
        self.transport.subscribe(topics.chunkreq(RUN, CLIENT), self._on_chunk_request)

    def _keep(self, message: InboundMessage) -> None:
        if self.watching:
            info, envelope = codec.decode_message(message.topic, message.payload, run=RUN)
            self.latest[info.kind.value] = envelope.body

    def _on_chunk_request(self, message: InboundMessage) -> None:
        self.chunk_requests.append(list(codec.decode_message(message.topic, message.payload, run=RUN)[1].body.hashes))

    def send(self, topic: str, payload: bytes) -> None:
        self.transport.publish(topic, payload, qos=1)

    def send_as_probe(self, msg_type: MessageType, body: Any, topic: str, round_: int = -1) -> None:
        self.send(topic, codec.encode(msg_type, body, run=RUN, round=round_, sender=PROBE))


def _wait(condition: Callable[[], bool], what: str, tester: Tester, workers: list[Worker], timeout: float = LIVE_TIMEOUT) -> None:
    """Poll ``condition`` (pumping the tester's messages) until it holds; fail early if a worker died."""
    deadline = time.monotonic() + timeout
    while not condition():
        for worker in workers:
            if worker.error is not None:
                raise AssertionError(f"{worker.name} raised while waiting for {what}") from worker.error
            if not worker.is_alive():
                raise AssertionError(f"{worker.name} ended ({worker.result!r}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        tester.transport.poll(0.1)


def _refusals(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.getMessage().startswith("refused ")]


def _match(entries: list[dict[str, Any]], refusals: list[str]) -> list[dict[str, Any]]:
    """Entries with no refusal log line of their own (topic, [reason], detail); each line counts once."""
    left = list(refusals)
    unmatched = []
    for entry in entries:
        key = f" on {entry['topic']}: [{entry['reason']}] "
        hit = next((i for i, line in enumerate(left) if key in line and entry["detail"] in line), None)
        if hit is None:
            unmatched.append(entry)
        else:
            left.pop(hit)
    return unmatched


@pytest.mark.integration
def test_live_coordinator_and_client_refuse_the_corpus_and_keep_serving(
    tmp_path: Path, broker_factory: Callable[..., Any], tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    started = time.monotonic()
    index = _index()
    to_coordinator = [e for e in index["entries"] if e["target"] == "coordinator"]
    to_client = [e for e in index["entries"] if e["target"] == "client"]
    broker = broker_factory("mosquitto")
    config = _config(tmp_path / "run.toml", tiny_model_dir, broker.port)
    run_dir = tmp_path / "run"
    stop = threading.Event()
    servers: list[CoordinatorServer] = []

    def serve() -> Any:
        pipeline = ModelPipeline.prepare(config, run_dir)
        transport = MqttTransport(TransportConfig(host="127.0.0.1", port=broker.port, client_id=COORDINATOR_ID)).connect()
        try:
            servers.append(CoordinatorServer(config, run_dir, pipeline, transport))
            return servers[0].run(stop=stop.is_set)
        finally:
            transport.close()

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"a fine film, number {i}", "label": i % 2}) + "\n" for i in range(8)))
    profile = detect_profile()
    statuses: list[str] = []
    client = EdgeClient(
        ClientOptions(run_id=RUN, client_id=CLIENT, state_dir=tmp_path / "client", coordinator_key=make_corpus.CORPUS_KEY.public),
        TransportConfig(host="127.0.0.1", port=broker.port, client_id=CLIENT),
        profile,
        load_rows(data),
        ClientEvents(on_status=statuses.append),
    )
    coordinator_thread = Worker("coordinator", serve)
    client_thread = Worker("client", lambda: client.run(stop=stop.is_set))
    tester = Tester(broker.port)
    workers = [coordinator_thread]
    try:
        coordinator_thread.start()
        _wait(lambda: "manifest" in tester.latest and "adapter" in tester.latest, "the coordinator to publish its tier", tester, workers)
        client_thread.start()
        workers.append(client_thread)
        tester.send_as_probe(MessageType.HELLO, Hello(PROBE, profile, 8, "corpus-probe"), topics.hello(RUN, PROBE))
        # A client of protocol 1.0 would format its rows without the run's task: refused at hello, with why.
        old = codec.encode(MessageType.HELLO, Hello(OLD_CLIENT, profile, 8, "fedsoda 0.0.9"), run=RUN, round=-1, sender=OLD_CLIENT, version="1.0")
        tester.send(topics.hello(RUN, OLD_CLIENT), old)
        running = lambda: (s := tester.latest.get("schedule")) is not None and s.status == "running" and s.round == ROUND  # noqa: E731
        _wait(running, "round 1 to start", tester, workers)
        assert set(tester.latest["schedule"].participants) == {CLIENT, PROBE}
        # The task travels in the schedule; the client formatted its rows with it (it has no label words of its own).
        assert tester.latest["schedule"].task == config.task.spec()
        _wait(lambda: "old_assignment" in tester.latest, "the 1.0 client's answer", tester, workers)
        refusal = tester.latest["old_assignment"]
        assert not refusal.accepted and "speaks protocol 1.0" in refusal.reason and "upgrade fedsoda on the client" in refusal.reason
        assert any("local rows formatted for the task rotten_tomatoes" in s for s in statuses)

        # A forged copy of the last chunk the client will need, slipped in as its download starts:
        # refused on arrival, never stored; the real chunk comes from the coordinator. It is signed
        # with the coordinator's key, so the check it meets is the chunk's hash.
        last_chunk = list(chunk_lengths(tester.latest["manifest"]))[-1]
        _wait(lambda: bool(tester.chunk_requests), "the client's first chunk request", tester, workers)
        forged = Chunk(blob_id=tester.latest["manifest"].blob_id, hash=last_chunk, data=b"forged bytes")
        tester.send(topics.chunk(RUN, CLIENT), codec.encode(MessageType.CHUNK, forged, run=RUN, round=-1, sender=COORDINATOR_ID,
                                                            signer=make_corpus.CORPUS_KEY))

        tester.watching = False
        for entry in to_coordinator:
            tester.send(entry["topic"], (MESSAGES_DIR / entry["file"]).read_bytes())
        # Stray chunks are the client's to refuse once its download is over (during it, the fetcher's).
        _wait(lambda: any(s.startswith("sub-LLM ready") for s in statuses), "the client's download", tester, workers)
        for entry in to_client:
            tester.send(entry["topic"], (MESSAGES_DIR / entry["file"]).read_bytes())
        _wait(lambda: not _match(index["entries"], _refusals(caplog.records)), "every corpus message's refusal", tester, workers)

        # Both processes still serve: a good update from the probe is accepted and averaged.
        adapter = tester.latest["adapter"]
        probe_delta = {key: torch.full(tuple(p.shape), 0.01) for key, p in adapter.tensors.items()}
        good = Update(PROBE, ROUND, 8, state_to_payloads(probe_delta), {"loss_last": 1.0}, ResourceReport(0, 0, 1.0, 1.0, 0, 0, "cpu"),
                      base_round=adapter.round, base_digest=payloads_digest(adapter.tensors))
        tester.send_as_probe(MessageType.UPDATE, good, topics.update(RUN, PROBE), round_=ROUND)
        _wait(lambda: not coordinator_thread.is_alive(), "the run to finish", tester, [])
        client_thread.join(timeout=60)
    finally:
        stop.set()
        tester.transport.close()
        for worker in (coordinator_thread, client_thread):
            if worker.is_alive():
                worker.join(timeout=60)
    elapsed = time.monotonic() - started
    for worker in (coordinator_thread, client_thread):
        assert worker.error is None, f"{worker.name} raised: {worker.error!r}"

    # Each message was refused with its own reason and detail, and counted; nothing else was.
    refusals = _refusals(caplog.records)
    unmatched = _match(index["entries"], refusals)
    assert not unmatched, "no refusal logged for:\n" + "\n".join(f"{e['file']}: [{e['reason']}] {e['detail']}" for e in unmatched)
    server = servers[0]
    assert server.counters.refused == Counter(e["reason"] for e in to_coordinator)
    assert dict(client.refused) == dict(Counter(e["reason"] for e in to_client) + Counter(ChunkHashMismatchError=1))
    forged_line = f"on {topics.chunk(RUN, CLIENT)}: [ChunkHashMismatchError] chunk {last_chunk[:12]} (12 bytes)"
    assert any(forged_line in line for line in refusals)
    assert hashlib.sha256(client.store.get(last_chunk)).hexdigest() == last_chunk  # the real one, verified

    # Both processes kept serving to the end of the run.
    assert coordinator_thread.result.status == "finished", coordinator_thread.result
    outcome = client_thread.result
    assert outcome.status == "finished" and outcome.rounds_sent == [ROUND], outcome
    assert outcome.refused == dict(client.refused)

    # The good update is in round 1's average: global_1 = global_0 + weighted mean of the deltas,
    # each with the weight and clip factor the influence bounds recorded for it.
    run = RunDir(run_dir)
    persisted = {u.client_id: u for u in run.updates(ROUND)}
    assert sorted(persisted) == [CLIENT, PROBE]
    before, after = run.load_global(0), run.load_global(ROUND)
    influence = run.load_influence(ROUND)
    assert influence is not None and {c.client_id for c in influence.clients} == {CLIENT, PROBE}
    total = sum(c.weight for c in influence.clients)
    deltas = {c: u.load_delta() for c, u in persisted.items()}
    for key, value in probe_delta.items():
        assert torch.equal(deltas[PROBE][key], value)
        factors = {c: influence.client(c).factor(key) for c in persisted}
        assert factors[PROBE] > 0
        mean = sum(influence.client(c).weight * factors[c] * deltas[c][key].float() for c in persisted) / total
        assert torch.allclose(after[key], before[key] + mean, atol=1e-6), key

    # The report keeps the refusal counts, and `fedsoda-coordinator report` shows them.
    report = json.loads((run_dir / "report.json").read_text())
    assert report["refused"] == dict(server.counters.refused)
    assert report["rounds"][0]["reported"] == [CLIENT, PROBE]
    shown = CliRunner().invoke(coordinator_app, ["report", str(run_dir), "--json", "--no-plots"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["refused"] == report["refused"]
    table = CliRunner().invoke(coordinator_app, ["report", str(run_dir), "--no-plots"])
    assert "refused inbound messages" in table.output and "MalformedMessageError" in table.output
    assert f"total {sum(report['refused'].values())}" in " ".join(table.output.split())
    print(f"live corpus run: {len(index['entries'])} messages refused, good update averaged, {elapsed:.1f} s")
