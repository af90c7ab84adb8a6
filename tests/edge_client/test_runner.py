"""The edge client's loop (edge_client.runner) against a real broker, with no coordinator.

Whole runs (hello, fetch, train, send) are covered by tests/integration and tests/faults.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from edge_client.data import load_rows, rows_from_records
from edge_client.runner import ClientOptions, EdgeClient
from shared import codec, topics
from shared.broker import BrokerHandle
from shared.errors import DataError, RunStateError
from shared.protocol import COORDINATOR_ID, MessageType, Schedule
from shared.tasks import TaskSpec
from shared.transport_types import InboundMessage, TransportConfig
from tests.shared.helpers import COORDINATOR_KEY, connect, drain, wait_for
from tests.shared.samples import profile, training


def test_presence_says_joined_on_the_first_connection_and_reconnected_after_a_drop(
    mosquitto_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path
) -> None:
    run_id, client_id = unique_id("run"), unique_id("edge")
    presence_topic = topics.presence(run_id, client_id)
    reasons: list[str] = []

    def on_presence(message: InboundMessage) -> None:
        reasons.append(codec.decode_message(message.topic, message.payload, run=run_id)[1].body.reason)

    watcher = connect(mosquitto_broker, unique_id("watcher"))
    watcher.subscribe(presence_topic, on_presence)
    transport_config = TransportConfig(
        host=mosquitto_broker.host, port=mosquitto_broker.port, client_id=client_id,
        reconnect_min_delay=0.1, reconnect_max_delay=1.0,
    )
    rows = rows_from_records([{"prompt": "2+2=", "answer": "4"}], source="inline")
    client = EdgeClient(ClientOptions(run_id, client_id, tmp_path, COORDINATOR_KEY.public), transport_config, profile(), rows)
    started = time.monotonic()
    before_drop: list[str] = []

    def stop() -> bool:
        # Called once per loop pass: the first pass handles the first connection's event.
        drain(watcher)
        elapsed = time.monotonic() - started
        if not before_drop:
            if elapsed > 1.5 and reasons:
                before_drop.extend(reasons)
                client.transport.drop_connection()
            return False
        assert elapsed < 30.0, f"no 'reconnected' presence after the drop: {reasons}"
        return "reconnected" in reasons

    outcome = client.run(stop=stop)
    assert outcome.status == "stopped"
    assert before_drop == ["joined"]
    wait_for(watcher, lambda _event: "left" in reasons)
    # The broker publishes the Last Will ("connection lost") when the drop cuts the socket.
    assert [r for r in reasons if r != "connection lost"] == ["joined", "reconnected", "left"]
    watcher.close()


def test_a_client_waiting_for_its_assignment_says_so_once_while_its_hello_repeats(
    mosquitto_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path, monkeypatch
) -> None:
    import edge_client.runner as runner

    monkeypatch.setattr(runner, "HELLO_RETRY_SECONDS", 0.2)
    run_id, client_id = unique_id("run"), unique_id("edge")
    hellos: list[bytes] = []
    watcher = connect(mosquitto_broker, unique_id("coordinator-stand-in"))
    watcher.subscribe(topics.hello(run_id, client_id), lambda message: hellos.append(message.payload))
    statuses: list[str] = []
    transport_config = TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port, client_id=client_id)
    rows = rows_from_records([{"prompt": "2+2=", "answer": "4"}], source="inline")
    events = runner.ClientEvents(on_status=statuses.append)
    client = EdgeClient(ClientOptions(run_id, client_id, tmp_path, COORDINATOR_KEY.public), transport_config, profile(), rows, events)
    started = time.monotonic()

    def stop() -> bool:
        drain(watcher)
        assert time.monotonic() - started < 30.0, f"only {len(hellos)} hellos"
        return len(hellos) >= 4

    client.run(stop=stop)
    watcher.close()
    assert len(hellos) >= 4  # nobody answers: the hello repeats, for a coordinator that starts late
    assert sum(s.startswith("said hello") for s in statuses) == 1, statuses


def _publish_schedule(broker: BrokerHandle, run_id: str, task, unique_id) -> None:
    """Play the coordinator: a retained waiting schedule, with ``task`` (None: a 1.0 coordinator's), signed."""
    schedule = Schedule(round=0, status="waiting", deadline=0.0, quorum=1, participants={}, training=training(),
                        manifests={}, adapter_round=0, task=task)
    coordinator = connect(broker, unique_id("coordinator-stand-in"))
    coordinator.publish(topics.schedule(run_id), codec.encode(MessageType.SCHEDULE, schedule, run=run_id, round=0, sender=COORDINATOR_ID, signer=COORDINATOR_KEY), retain=True)
    coordinator.flush()
    coordinator.close()


def test_rows_that_do_not_fit_the_schedule_task_stop_the_client_with_file_and_line(
    mosquitto_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path
) -> None:
    run_id, client_id = unique_id("run"), unique_id("edge")
    data = tmp_path / "reviews.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n{"text": "odd", "label": "meh"}\n')
    _publish_schedule(mosquitto_broker, run_id, TaskSpec(), unique_id)
    transport_config = TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port, client_id=client_id)
    client = EdgeClient(ClientOptions(run_id, client_id, tmp_path / "state", COORDINATOR_KEY.public), transport_config, profile(), load_rows(data))
    started = time.monotonic()
    with pytest.raises(DataError, match=rf"{data}:2: label 'meh' is not one of the task's labels"):
        client.run(stop=lambda: time.monotonic() - started > 30.0)
    assert client.dataset is None  # nothing formatted, nothing trained


def test_a_schedule_without_a_task_is_from_a_1_0_coordinator_and_says_so(
    mosquitto_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path
) -> None:
    run_id, client_id = unique_id("run"), unique_id("edge")
    _publish_schedule(mosquitto_broker, run_id, None, unique_id)
    transport_config = TransportConfig(host=mosquitto_broker.host, port=mosquitto_broker.port, client_id=client_id)
    rows = rows_from_records([{"prompt": "2+2=", "answer": "4"}], source="inline")
    client = EdgeClient(ClientOptions(run_id, client_id, tmp_path, COORDINATOR_KEY.public), transport_config, profile(), rows)
    started = time.monotonic()
    with pytest.raises(RunStateError, match="speaks protocol 1.0.*upgrade the coordinator"):
        client.run(stop=lambda: time.monotonic() - started > 30.0)
