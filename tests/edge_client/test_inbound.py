"""What the edge client takes against what it holds: a refused message never moves its markers.

The rules (:mod:`edge_client.inbound`) first as functions, then in a running client on the
real embedded broker. There every message is signed with the coordinator's key, so it gets
past the signature check to the rules behind it, as a replayed or mistaken message would.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import edge_client.runner as runner
from edge_client.data import rows_from_records
from edge_client.inbound import (
    MAX_ROUND_JUMP,
    REFUSALS,
    Refusal,
    adapter_refusal,
    assignment_refusal,
    manifest_refusal,
    schedule_refusal,
)
from edge_client.runner import ClientOptions, EdgeClient
from shared import codec, topics
from shared.broker import BrokerHandle
from shared.errors import BlobError
from shared.protocol import (
    COORDINATOR_ID,
    MAX_ROUND,
    Assignment,
    GlobalAdapter,
    Manifest,
    MessageType,
    Nack,
    Schedule,
)
from shared.signing import SigningKey
from shared.tasks import TaskSpec
from shared.transport import MqttTransport
from shared.transport_types import TransportConfig
from tests.shared.helpers import connect
from tests.shared.samples import profile, training

KEY = SigningKey.from_seed(b"tests/edge_client inbound key...")


def _schedule(round_: int, adapter_round: int | None = None, **fields: object) -> Schedule:
    values: dict[str, object] = dict(
        round=round_, status="waiting", deadline=0.0, quorum=1, participants={}, training=training(),
        manifests={}, adapter_round=round_ - 1 if adapter_round is None else adapter_round, task=TaskSpec(),
    )
    values.update(fields)
    return Schedule(**values)  # type: ignore[arg-type]


def _manifest(version: int, blob_id: str) -> Manifest:
    return Manifest(blob_id=blob_id, name="m", version=version, tier="L4", chunk_size=8, files=[], meta={})


def _reason(refusal: Refusal | None) -> str | None:
    return None if refusal is None else refusal.reason


# --------------------------------------------------------------------------- the rules


def test_a_schedule_may_not_go_back_nor_jump_implausibly() -> None:
    held = _schedule(5)
    assert schedule_refusal(_schedule(5), held) is None  # a repeat (status change) of the same round
    assert schedule_refusal(_schedule(6), held) is None
    assert schedule_refusal(_schedule(5 + MAX_ROUND_JUMP), held) is None  # a client that was away
    assert _reason(schedule_refusal(_schedule(4), held)) == "stale"
    assert _reason(schedule_refusal(_schedule(6 + MAX_ROUND_JUMP), held)) == "implausible_round"
    # Without a held schedule only the absolute bound and the schedule's own numbers apply.
    assert schedule_refusal(_schedule(7), None) is None
    assert _reason(schedule_refusal(_schedule(10**9), None)) == "implausible_round"
    assert _reason(schedule_refusal(_schedule(3, adapter_round=4), None)) == "implausible_round"
    assert schedule_refusal(_schedule(3, adapter_round=3, status="finished"), None) is None


def test_an_adapter_may_not_be_ahead_of_the_schedule_nor_go_back() -> None:
    schedule = _schedule(3)  # round 3 starts from adapter 2; adapter 3 comes before schedule 4
    held = GlobalAdapter(round=2, tensors={})
    assert adapter_refusal(GlobalAdapter(round=3, tensors={}), held, schedule) is None
    assert _reason(adapter_refusal(GlobalAdapter(round=4, tensors={}), held, schedule)) == "implausible_round"
    assert _reason(adapter_refusal(GlobalAdapter(round=10**9, tensors={}), held, schedule)) == "implausible_round"
    assert _reason(adapter_refusal(GlobalAdapter(round=1, tensors={}), held, schedule)) == "stale"
    assert adapter_refusal(GlobalAdapter(round=40, tensors={}), None, None) is None  # no schedule yet to bound it
    assert _reason(adapter_refusal(GlobalAdapter(round=MAX_ROUND + 1, tensors={}), None, None)) == "implausible_round"


def test_the_manifest_the_schedule_names_is_taken_whatever_version_is_held() -> None:
    forged = _manifest(10**9, "f" * 64)
    real = _manifest(2, "a" * 64)
    assert _reason(manifest_refusal(real, forged, None)) == "stale"
    assert _reason(manifest_refusal(real, forged, _schedule(3, manifests={"L4": "b" * 64}))) == "stale"
    assert manifest_refusal(real, forged, _schedule(3, manifests={"L4": "a" * 64})) is None
    assert manifest_refusal(_manifest(3, "c" * 64), real, None) is None  # a newer version (re-alignment)


def test_an_admission_is_settled_once() -> None:
    admitted = Assignment(client_id="edge", accepted=True, tier="L4", reason="fits", plan={"batch_size": 2})
    refused = Assignment(client_id="edge", accepted=False, tier="", reason="too small", plan={})
    assert assignment_refusal(admitted, None) is None
    assert assignment_refusal(refused, None) is None  # a refused hello: terminal, from the assignment
    assert assignment_refusal(dataclasses.replace(admitted), admitted) is None  # the answer to a repeated hello
    assert _reason(assignment_refusal(refused, admitted)) == "assignment_changed"
    assert _reason(assignment_refusal(dataclasses.replace(admitted, tier="L9"), admitted)) == "assignment_changed"
    assert assignment_refusal(admitted, refused) is None  # never held as admitted: nothing to contradict


def test_every_refusal_reason_is_in_the_table() -> None:
    with pytest.raises(ValueError, match="not in REFUSALS"):
        Refusal("rude", "")
    assert {"stale", "implausible_round", "assignment_changed"} <= set(REFUSALS)


# --------------------------------------------------------------------------- in a running client


class StandIn:
    """Plays the coordinator on the broker: publishes signed messages, as retained ones where it would."""

    def __init__(self, broker: BrokerHandle, run_id: str, client_id: str, unique_id: Callable[[str], str]) -> None:
        self.run_id, self.client_id = run_id, client_id
        self.transport: MqttTransport = connect(broker, unique_id("coordinator-stand-in"))

    def send(self, topic: str, msg_type: MessageType, body: object, *, retain: bool = False) -> None:
        payload = codec.encode(msg_type, body, run=self.run_id, round=-1, sender=COORDINATOR_ID, signer=KEY)
        self.transport.publish(topic, payload, retain=retain)
        assert self.transport.flush(10.0)

    def schedule(self, schedule: Schedule) -> None:
        self.send(topics.schedule(self.run_id), MessageType.SCHEDULE, schedule, retain=True)

    def adapter(self, round_: int, *, retain: bool = True) -> None:
        self.send(topics.adapter(self.run_id), MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=round_, tensors={}), retain=retain)

    def close(self) -> None:
        for topic in (topics.schedule(self.run_id), topics.adapter(self.run_id)):
            self.transport.publish(topic, b"", retain=True)  # no retained state left for other tests
        self.transport.flush(10.0)
        self.transport.close()


def _client(broker: BrokerHandle, run_id: str, client_id: str, state: Path) -> EdgeClient:
    config = TransportConfig(host=broker.host, port=broker.port, client_id=client_id, connect_timeout=10.0)
    rows = rows_from_records([{"text": "fine", "label": 1}], source="inline")
    return EdgeClient(ClientOptions(run_id, client_id, state, coordinator_key=KEY.public), config, profile(), rows)


def _run_steps(client: EdgeClient, steps: list[tuple[Callable[[], bool], Callable[[], None]]], timeout: float = 30.0) -> None:
    """Run the client; whenever the next step's condition holds, do its action; stop after the last."""
    todo = list(steps)
    started = time.monotonic()

    def stop() -> bool:
        assert time.monotonic() - started < timeout, f"stuck before step {len(steps) - len(todo) + 1}: {client.refused}"
        while todo and todo[0][0]():
            todo.pop(0)[1]()
        return not todo

    outcome = client.run(stop=stop)
    assert outcome.status == "stopped"


@pytest.fixture
def stand_in(embedded_broker: BrokerHandle, unique_id: Callable[[str], str]):
    run_id, client_id = unique_id("run"), unique_id("edge")
    coordinator = StandIn(embedded_broker, run_id, client_id, unique_id)
    yield coordinator
    coordinator.close()


def test_a_forged_round_is_refused_and_the_next_real_message_is_taken(embedded_broker, stand_in: StandIn, tmp_path) -> None:
    stand_in.schedule(_schedule(2))
    stand_in.adapter(1)
    client = _client(embedded_broker, stand_in.run_id, stand_in.client_id, tmp_path)

    def forge() -> None:
        stand_in.adapter(10**9, retain=False)
        stand_in.schedule(_schedule(10**9 - 1))
        stand_in.schedule(_schedule(2 + MAX_ROUND_JUMP + 1))
        # What the coordinator really sends next: round 2's adapter, then round 3's schedule.
        stand_in.adapter(2)
        stand_in.schedule(_schedule(3))

    _run_steps(client, [
        (lambda: client.schedule is not None and client.adapter is not None, forge),
        (lambda: client.schedule.round == 3 and client.adapter.round == 2, lambda: None),
    ])
    assert client.refused["implausible_round"] == 3 and not client.refused["stale"]


def test_an_adapter_held_before_any_schedule_is_dropped_when_the_schedule_shows_it_implausible(
    embedded_broker, stand_in: StandIn, tmp_path
) -> None:
    stand_in.adapter(1)  # retained: the real one
    client = _client(embedded_broker, stand_in.run_id, stand_in.client_id, tmp_path)
    _run_steps(client, [
        (lambda: client.adapter is not None, lambda: stand_in.adapter(10**6, retain=False)),  # nothing bounds it yet
        (lambda: client.adapter.round == 10**6, lambda: stand_in.schedule(_schedule(2))),
        # The schedule shows it is ahead: dropped, and the broker's retained adapter is asked for again.
        (lambda: client.schedule is not None and client.adapter is not None and client.adapter.round == 1, lambda: None),
    ])
    assert client.refused["implausible_round"] == 1


def test_an_admitted_client_refuses_a_later_refusal_and_keeps_few_nacks(embedded_broker, stand_in: StandIn, tmp_path) -> None:
    client = _client(embedded_broker, stand_in.run_id, stand_in.client_id, tmp_path)
    admitted = Assignment(client_id=stand_in.client_id, accepted=True, tier="L4", reason="fits", plan={})
    assign = topics.assign(stand_in.run_id, stand_in.client_id)
    nack_topic = topics.nack(stand_in.run_id, stand_in.client_id)

    def contradict() -> None:
        stand_in.send(assign, MessageType.ASSIGNMENT, dataclasses.replace(admitted, accepted=False, tier="", reason="go away"))
        for i in range(runner.MAX_NACKS_KEPT + 20):
            stand_in.send(nack_topic, MessageType.NACK, Nack(stand_in.client_id, 1, "", "late", f"nack {i}"))

    _run_steps(client, [
        (lambda: True, lambda: stand_in.send(assign, MessageType.ASSIGNMENT, admitted)),
        (lambda: client.assignment is not None, contradict),
        (lambda: any(n["reason"] == f"nack {runner.MAX_NACKS_KEPT + 19}" for n in client.nacks), lambda: None),
    ])
    assert client.assignment == admitted and client.refused["assignment_changed"] == 1
    assert len(client.nacks) == runner.MAX_NACKS_KEPT and client.nacks[0]["reason"] == "nack 20"


def test_a_failed_download_is_retried_with_backoff_then_the_round_is_given_up(tmp_path, monkeypatch) -> None:
    """Not on a broker: the policy of :meth:`EdgeClient._train_and_send` when the fetch raises."""
    monkeypatch.setattr(runner, "FETCH_RETRY_SECONDS", 0.2)
    client = _client(BrokerHandle("embedded", "127.0.0.1", 1, tmp_path), "run-x", "edge-x", tmp_path / "state")
    manifest = _manifest(1, "a" * 64)
    client.assignment = Assignment(client_id="edge-x", accepted=True, tier="L4", reason="fits", plan={})
    client.manifests = {"L4": manifest}
    client.adapter = GlobalAdapter(round=1, tensors={})
    schedule = _schedule(2, status="running", participants={"edge-x": "L4"}, manifests={"L4": manifest.blob_id})
    fetches: list[str] = []

    def refused(m: Manifest):
        fetches.append(m.blob_id)
        raise BlobError("chunk 0123 still missing after 6 requests (last refusal: unknown_chunk: forged)")

    monkeypatch.setattr(client, "_model_for", refused)
    for attempt in range(1, runner.FETCH_ATTEMPTS + 1):
        deadline = time.monotonic() + 5
        while not client._ready_to_train(schedule):  # the backoff, then ready again
            assert time.monotonic() < deadline, f"attempt {attempt} never became ready"
            time.sleep(0.05)
        client._train_and_send(schedule)  # does not raise: the client stays in the run
        assert len(fetches) == attempt
    assert not client._ready_to_train(schedule)  # round 2 given up after FETCH_ATTEMPTS
    time.sleep(0.5)
    assert not client._ready_to_train(schedule)
    # The next round is another chance.
    assert client._ready_to_train(dataclasses.replace(schedule, round=3, adapter_round=1))
