"""A stranger on the embedded broker during a client's download: the client still trains and sends (issue #14).

The stranger, on the client's topics (the embedded broker has no ACL), does three things the
moment the client asks for its first chunk:

- it asks the coordinator, as the client, for a blob that does not exist, so the *real*
  coordinator answers the client with a genuine, correctly signed ``unknown_blob`` nack
  (signatures cannot tell this refusal from one the client earned: only the retry can);
- it publishes a forged nack of its own, and
- a forged global adapter of round 10**9, retained, the message that used to make every
  real adapter look stale.

The client retries the refused requests, completes the download, trains and sends its
update; the coordinator then finishes the run and the client ends ``finished``. Everything on
the wire is real (embedded broker, signed coordinator messages, BlobServer, BlobFetcher, the
client's outbox); loading the package and training are replaced by stand-ins, since whole
training runs are tests/integration's (60-120 s each).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import edge_client.runner as runner
from edge_client.data import rows_from_records
from edge_client.runner import ClientOptions, EdgeClient
from edge_client.trainer import TrainResult
from hardware_profiles.assignment import MemoryCheck
from shared import codec, topics
from shared.blob_server import BlobServer
from shared.broker import BrokerHandle
from shared.manifests import build_manifest
from shared.protocol import (
    COORDINATOR_ID,
    Assignment,
    ChunkRequest,
    GlobalAdapter,
    MessageType,
    Nack,
    Schedule,
)
from shared.signing import SigningKey
from shared.subllm import PackageMeta
from shared.tasks import TaskSpec
from shared.transport_types import InboundMessage, TransportConfig
from tests.shared.helpers import connect, write_folder
from tests.shared.samples import profile, training

WAIT = 60.0
TIER = "L4"


def test_a_client_completes_its_round_through_forged_and_provoked_refusals(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path, monkeypatch
) -> None:
    run, client_id = unique_id("run"), unique_id("edge")
    key = SigningKey.generate()
    src = write_folder(tmp_path / "package", {"weights.bin": os.urandom(96 * 1024), "config.json": b"{}"})
    manifest = build_manifest(src, "pkg", 1, TIER, meta={"model_config": {}}, chunk_size=8 * 1024)
    schedule = Schedule(round=1, status="running", deadline=time.time() + 600, quorum=1, participants={client_id: TIER},
                        training=training(), manifests={TIER: manifest.blob_id}, adapter_round=0, task=TaskSpec())
    _stand_in_for_the_model(monkeypatch)

    coordinator = connect(embedded_broker, unique_id("coordinator"))
    blobs = BlobServer(coordinator, run=run, signer=key)
    blobs.add(manifest, src)
    updates: list[int] = []

    def send(topic: str, msg_type: MessageType, body: Any, *, retain: bool = False, signer: SigningKey | None = key) -> None:
        coordinator_or_stranger = coordinator if signer is key else stranger
        payload = codec.encode(msg_type, body, run=run, round=-1, sender=COORDINATOR_ID, signer=signer)
        coordinator_or_stranger.publish(topic, payload, qos=1, retain=retain)

    def on_hello(message: InboundMessage) -> None:
        send(topics.assign(run, client_id), MessageType.ASSIGNMENT,
             Assignment(client_id=client_id, accepted=True, tier=TIER, reason="fits", plan={}))

    def on_chunk_request(message: InboundMessage) -> None:
        info, envelope = codec.decode_message(message.topic, message.payload, run=run)
        blobs.serve(info.client, envelope.body, ref_message_id=envelope.message_id)

    def on_update(message: InboundMessage) -> None:
        updates.append(codec.decode_message(message.topic, message.payload, run=run)[1].body.round)
        finished = dataclasses.replace(schedule, status="finished", adapter_round=1)
        send(topics.schedule(run), MessageType.SCHEDULE, finished, retain=True)

    coordinator.subscribe(topics.hello(run, client_id), on_hello)
    coordinator.subscribe(topics.chunkreq(run, client_id), on_chunk_request)
    coordinator.subscribe(topics.update(run, client_id), on_update)
    send(topics.manifest(run, TIER), MessageType.MANIFEST, manifest, retain=True)
    send(topics.adapter(run), MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=0, tensors={}), retain=True)
    send(topics.schedule(run), MessageType.SCHEDULE, schedule, retain=True)
    assert coordinator.flush(10.0)

    stranger = connect(embedded_broker, unique_id("mallory"))
    attacked: list[float] = []

    def attack(message: InboundMessage) -> None:
        if attacked or codec.decode_message(message.topic, message.payload, run=run)[1].sender != client_id:
            return  # once, on the client's own first request (not on the stranger's)
        attacked.append(time.monotonic())
        provoke = codec.encode(MessageType.CHUNK_REQUEST, ChunkRequest(blob_id="0" * 64, hashes=["0" * 64]),
                               run=run, round=-1, sender=client_id)
        stranger.publish(topics.chunkreq(run, client_id), provoke, qos=1)
        send(topics.nack(run, client_id), MessageType.NACK, Nack(client_id, -1, "", "unknown_chunk", "forged"), signer=None)
        send(topics.adapter(run), MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=10**9, tensors={}), retain=True, signer=None)

    stranger.subscribe(topics.chunkreq(run, client_id), attack)

    config = TransportConfig(host=embedded_broker.host, port=embedded_broker.port, client_id=client_id, connect_timeout=10.0)
    rows = rows_from_records([{"text": "a fine film", "label": 1}], source="inline")
    client = EdgeClient(ClientOptions(run, client_id, tmp_path / "state", coordinator_key=key.public), config, profile(), rows)
    outcome: list[Any] = []
    worker = threading.Thread(target=lambda: outcome.append(client.run()), daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + WAIT
        while worker.is_alive():
            assert time.monotonic() < deadline, f"the client never finished: refused {client.refused}, nacks {list(client.nacks)}"
            coordinator.poll(0.05)
            stranger.poll(0.05)
        worker.join()
    finally:
        for topic in (topics.schedule(run), topics.adapter(run), topics.manifest(run, TIER)):
            coordinator.publish(topic, b"", qos=1, retain=True)  # no retained state left on the session broker
        coordinator.flush(10.0)
        coordinator.close()
        stranger.close()
    assert attacked, "the stranger never saw a chunk request, so it attacked nothing"
    assert outcome, "the client raised instead of finishing (see the log)"
    assert outcome[0].status == "finished" and outcome[0].rounds_sent == [1] and updates[:1] == [1]
    assert blobs.refused["unknown_blob"] >= 1  # the refusal the stranger provoked reached the client
    assert any(n["code"] == "unknown_blob" for n in outcome[0].nacks)
    assert outcome[0].refused.get("SignatureError", 0) >= 2  # the forged nack and adapter
    assert client.adapter is not None and client.adapter.round == 0


def _stand_in_for_the_model(monkeypatch) -> None:
    """Preflight, loading and training replaced: this test is about the wire, not the model."""
    monkeypatch.setattr(runner, "preflight", lambda *_a, **_k: MemoryCheck(True, 1, 2, "L4 fits (stand-in)"))
    meta = PackageMeta(name="pkg", tier=TIER, version=1, precision="fp32", layer_map=(0, 1, 2, 3),
                       layers_prefix="model.layers", full_num_layers=4, model_type="llama")
    monkeypatch.setattr(runner, "load_package", lambda folder, device: (object(), object(), meta))

    def train(*_args: object, **_kwargs: object) -> TrainResult:
        return TrainResult(delta={"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, 2)},
                           num_examples=1, metrics={"loss_last": 0.5})

    monkeypatch.setattr(runner, "train_adapter", train)
