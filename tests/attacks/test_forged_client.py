"""A stranger on the broker speaks for a client: once its key is pinned, the coordinator must not listen.

A client's hello carries its public key and everything it sends is signed by it; the
coordinator pins the key at the client's first accepted hello (kept with the run, so a
resumed run keeps it), or beforehand from the credentials registry. After that a hello,
presence, chunk request or update in the client's name that its key did not sign is refused
as a :class:`~shared.errors.SignatureError`: a forged hello no longer re-assigns (evicts) the
client, a forged presence no longer marks it offline.

The real :class:`~coordinator.run.server.CoordinatorServer` runs in a thread of this process
on the embedded broker, with a model side that serves one small tier and never trains.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from coordinator.run.client_keys import CLIENT_KEYS_FILE
from coordinator.run.credentials import CredentialStore
from coordinator.run.server import CoordinatorServer
from coordinator.settings import RunConfig
from shared import codec, topics
from shared.broker import BrokerHandle
from shared.manifests import build_manifest
from shared.protocol import (
    Assignment,
    ChunkRequest,
    DeviceProfile,
    Hello,
    Manifest,
    MessageType,
    Presence,
    TrainingParams,
)
from shared.signing import SigningKey
from shared.transport import MqttTransport
from shared.transport_types import InboundMessage
from tests.shared.helpers import connect, write_folder
from tests.shared.samples import profile, training

WAIT = 30.0


@dataclasses.dataclass
class Tier:
    """One published tier (what the server reads of it)."""

    name: str
    version: int
    folder: Path
    manifest: Manifest

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class OneTier:
    """A model side with one small tier that admits every device and never trains."""

    def __init__(self, folder: Path) -> None:
        write_folder(folder, {"weights.bin": b"w" * 1000})
        self._tiers = {"T": Tier("T", 1, folder, build_manifest(folder, "pkg", 1, "T"))}

    @property
    def tiers(self) -> Mapping[str, Tier]:
        return self._tiers

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        return {}

    def expected_shapes(self, round_num: int) -> dict[str, dict[str, tuple[int, ...]]]:
        return {"T": {}}

    def round_training(self, round_num: int) -> TrainingParams:
        return training()

    def assign(self, client_id: str, profile: DeviceProfile) -> Assignment:
        return Assignment(client_id=client_id, accepted=True, tier="T", reason="fits", plan={})

    def realign(self, global_state: dict[str, torch.Tensor], version: int) -> Mapping[str, Tier]:
        return self._tiers

    def finish(self, global_state: dict[str, torch.Tensor], run_dir: Path) -> dict[str, Any]:
        return {}

    def evaluate_round(self, global_state: dict[str, torch.Tensor], round_: int) -> dict[str, Any]:
        return {}


class Serving:
    """A CoordinatorServer's ``run`` in a thread (it waits for 5 clients, so no round starts)."""

    def __init__(self, broker: BrokerHandle, run: str, run_dir: Path, pipeline: OneTier, *, resume: bool = False,
                 **broker_settings: Any) -> None:
        config = RunConfig(run_id=run)
        config = dataclasses.replace(
            config,
            rounds=dataclasses.replace(config.rounds, min_clients=5),
            broker=dataclasses.replace(config.broker, **broker_settings),
        )
        self.transport = connect(broker, f"coordinator-{run}")
        self.server = CoordinatorServer(config, run_dir, pipeline, self.transport, resume=resume)
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.server.run(stop=self.stop.is_set)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def until(self, condition: Callable[[], bool], what: str, pump: MqttTransport) -> None:
        deadline = time.monotonic() + WAIT
        while not condition():
            assert self.error is None, f"the coordinator raised while waiting for {what}: {self.error!r}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            pump.poll(0.05)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(WAIT)
        self.transport.close()
        assert self.error is None, self.error


class Client:
    """A scripted client: its own connection, its key, and what the coordinator answers it."""

    def __init__(self, broker: BrokerHandle, run: str, client_id: str, key: SigningKey | None, mqtt_id: str = "") -> None:
        self.run, self.client_id, self.key = run, client_id, key
        self.transport = connect(broker, mqtt_id or f"{client_id}-{run}")
        self.assignments: list[Assignment] = []
        self.transport.subscribe(topics.assign(run, client_id), self._on_assignment)

    def _on_assignment(self, message: InboundMessage) -> None:
        self.assignments.append(codec.decode_message(message.topic, message.payload, run=self.run)[1].body)

    def send(self, topic: str, msg_type: MessageType, body: Any, *, signer: SigningKey | None) -> None:
        payload = codec.encode(msg_type, body, run=self.run, round=-1, sender=self.client_id, signer=signer)
        self.transport.publish(topic, payload, qos=1)
        self.transport.flush()

    def hello(self, *, signer: SigningKey | None, public_key: str) -> None:
        body = Hello(self.client_id, profile(), 8, "test", public_key=public_key)
        self.send(topics.hello(self.run, self.client_id), MessageType.HELLO, body, signer=signer)

    def presence(self, online: bool, *, signer: SigningKey | None) -> None:
        # Not retained (a real client's is): nothing is left on the session broker for a later run.
        body = Presence(self.client_id, online, "joined" if online else "connection lost")
        self.send(topics.presence(self.run, self.client_id), MessageType.PRESENCE, body, signer=signer)

    def close(self) -> None:
        self.transport.close()


def test_forged_hello_presence_and_chunk_request_change_nothing_once_a_key_is_pinned(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run = unique_id("run")
    key, mallory_key = SigningKey.generate(), SigningKey.generate()
    pipeline = OneTier(tmp_path / "tier")
    serving = Serving(embedded_broker, run, tmp_path / "run", pipeline)
    alice = Client(embedded_broker, run, "alice", key)
    mallory = Client(embedded_broker, run, "alice", None, mqtt_id=unique_id("mallory"))  # speaks as alice, on its own connection
    server = serving.server
    try:
        alice.presence(True, signer=key)
        alice.hello(signer=key, public_key=key.public.text)
        serving.until(lambda: len(alice.assignments) == 1, "alice's assignment", alice.transport)
        assert json.loads((tmp_path / "run" / CLIENT_KEYS_FILE).read_text()) == {"alice": key.public.text}
        assert server.state.client("alice").online

        refused_before = server.counters.refused["SignatureError"]
        # A hello in alice's name, unsigned; one signed by mallory's own key and bringing it; her offline presence;
        # a chunk request in her name: each refused, none re-assigns her or marks her offline.
        mallory.hello(signer=None, public_key="")
        mallory.hello(signer=mallory_key, public_key=mallory_key.public.text)
        mallory.presence(False, signer=None)
        request = ChunkRequest(pipeline.tiers["T"].manifest.blob_id, list(pipeline.tiers["T"].manifest.files[0].chunks))
        mallory.send(topics.chunkreq(run, "alice"), MessageType.CHUNK_REQUEST, request, signer=mallory_key)
        serving.until(lambda: server.counters.refused["SignatureError"] - refused_before == 4, "four refusals", alice.transport)
        assert server.state.client("alice").online and len(alice.assignments) == 1
        assert server.blobs.chunks_served == 0

        # Alice's own signed presence is heard: the refusals above were about the signatures.
        alice.presence(False, signer=key)
        serving.until(lambda: not server.state.client("alice").online, "alice's own offline presence", alice.transport)
    finally:
        serving.close()
        alice.close()
        mallory.transport.close()

    # A resumed run keeps the pin: a stranger's hello is still refused, alice's own is answered.
    resumed = Serving(embedded_broker, run, tmp_path / "run", pipeline, resume=True)
    alice = Client(embedded_broker, run, "alice", key)
    try:
        assert resumed.server.client_keys["alice"].text == key.public.text
        alice.hello(signer=mallory_key, public_key=mallory_key.public.text)
        resumed.until(lambda: resumed.server.counters.refused["SignatureError"] == 1, "the refusal after resume", alice.transport)
        alice.hello(signer=key, public_key=key.public.text)
        resumed.until(lambda: len(alice.assignments) == 1, "alice's assignment after resume", alice.transport)
    finally:
        resumed.close()
        alice.close()


def test_a_first_hello_must_be_signed_by_the_key_it_brings(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run = unique_id("run")
    key, other = SigningKey.generate(), SigningKey.generate()
    serving = Serving(embedded_broker, run, tmp_path / "run", OneTier(tmp_path / "tier"))
    carol = Client(embedded_broker, run, "carol", key)
    try:
        carol.hello(signer=other, public_key=key.public.text)  # brings carol's key, signed by another
        carol.hello(signer=None, public_key=key.public.text)  # brings it, unsigned
        serving.until(lambda: serving.server.counters.refused["SignatureError"] == 2, "two refusals", carol.transport)
        assert carol.assignments == [] and serving.server.client_keys == {}
        # An unsigned client older than 1.3 brings no key: it is admitted, and nothing is pinned for it.
        carol.hello(signer=None, public_key="")
        serving.until(lambda: len(carol.assignments) == 1, "carol's assignment", carol.transport)
        assert serving.server.client_keys == {}
    finally:
        serving.close()
        carol.close()


def test_with_a_credentials_registry_the_key_is_pinned_before_any_hello(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run = unique_id("run")
    store = CredentialStore(tmp_path / "creds")
    creds = store.add("dave", broker="127.0.0.1:1")
    dave_key = SigningKey.from_private_text(creds.client_key)
    # Your own broker on the folder's logins: here the embedded one stands in for it.
    serving = Serving(embedded_broker, run, tmp_path / "run", OneTier(tmp_path / "tier"),
                      mode="external", credentials_dir=str(store.directory))
    dave = Client(embedded_broker, run, "dave", dave_key)
    try:
        assert serving.server.client_keys["dave"].text == dave_key.public.text
        stranger = SigningKey.generate()
        dave.hello(signer=stranger, public_key=stranger.public.text)  # first come is not first pinned
        serving.until(lambda: serving.server.counters.refused["SignatureError"] == 1, "the refusal", dave.transport)
        dave.hello(signer=dave_key, public_key=dave_key.public.text)
        serving.until(lambda: len(dave.assignments) == 1, "dave's assignment", dave.transport)
        assert not (tmp_path / "run" / CLIENT_KEYS_FILE).exists()  # the registry's keys are not pinned again
    finally:
        serving.close()
        dave.close()
