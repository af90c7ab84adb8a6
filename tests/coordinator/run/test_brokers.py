"""The coordinator's MQTT client id: unguessable, one per run folder, and its session survives a stranger.

A broker hands a persistent session to whoever connects with its client id, so these run on
the real embedded broker started as ``serve`` starts it (:func:`broker_for`).
"""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from coordinator.run.brokers import CLIENT_ID_FILE, broker_for, coordinator_client_id
from coordinator.settings import BrokerSettings
from shared import topics
from shared.errors import RunStateError
from shared.protocol import COORDINATOR_ID
from shared.transport import MqttTransport
from shared.transport_types import ConnectionEvent, InboundMessage, TransportConfig
from tests.shared.helpers import connect, drain, wait_message


def test_the_client_id_is_random_once_per_run_folder(tmp_path: Path) -> None:
    (tmp_path / "run-a").mkdir()
    first = coordinator_client_id(tmp_path / "run-a")
    assert re.fullmatch(r"coordinator-[0-9a-f]{32}", first)
    assert coordinator_client_id(tmp_path / "run-a") == first  # a resumed coordinator reuses it
    assert stat.S_IMODE((tmp_path / "run-a" / CLIENT_ID_FILE).stat().st_mode) == 0o600
    (tmp_path / "run-b").mkdir()
    assert coordinator_client_id(tmp_path / "run-b") != first


def test_a_tampered_client_id_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / CLIENT_ID_FILE).write_text(COORDINATOR_ID + "\n")
    with pytest.raises(RunStateError, match="does not hold a coordinator MQTT client id"):
        coordinator_client_id(tmp_path)


def test_a_stranger_with_the_old_fixed_id_does_not_disturb_the_coordinator(tmp_path: Path, unique_id) -> None:
    run, client = unique_id("run"), unique_id("edge")
    settings = BrokerSettings(mode="embedded", port=0)
    with broker_for(settings, lambda _m: None, client_id=coordinator_client_id(tmp_path)) as endpoint:
        assert endpoint.coordinator.client_id != COORDINATOR_ID
        coordinator = MqttTransport(endpoint.coordinator).connect()
        edge = stranger = None
        try:
            coordinator.subscribe(topics.update(run, client))
            drain(coordinator)
            # The attack that worked with the fixed id: take over the coordinator's session.
            stranger = MqttTransport(
                TransportConfig(endpoint.host, endpoint.port, client_id=COORDINATOR_ID, connect_timeout=10.0)
            ).connect()
            stranger.subscribe(topics.all_of(run, topics.TopicKind.UPDATE))
            edge = MqttTransport(TransportConfig(endpoint.host, endpoint.port, client_id=client, connect_timeout=10.0)).connect()
            edge.publish(topics.update(run, client), b"the update")
            assert edge.flush(10.0)
            assert wait_message(coordinator, topics.update(run, client)).payload == b"the update"
            # The coordinator never lost its link (a takeover shows as a disconnect event).
            assert not any(isinstance(e, ConnectionEvent) and not e.connected for e in drain(coordinator))
            assert coordinator.connected and coordinator.reconnects == 0
        finally:
            for transport in (edge, stranger, coordinator):
                if transport is not None:
                    transport.close()


def test_a_resumed_coordinator_gets_the_updates_sent_while_it_was_down(tmp_path: Path, embedded_broker, unique_id) -> None:
    """The persistent session is keyed by the id kept in the run folder."""
    run, client = unique_id("run"), unique_id("edge")
    settings = BrokerSettings(mode="external", host=embedded_broker.host, port=embedded_broker.port)
    with broker_for(settings, lambda _m: None, client_id=coordinator_client_id(tmp_path)) as endpoint:
        first = MqttTransport(endpoint.coordinator).connect()
        first.subscribe(topics.update(run, client))
        first.close()
    edge = connect(embedded_broker, client)
    try:
        edge.publish(topics.update(run, client), b"sent while the coordinator was down")
        assert edge.flush(10.0)
    finally:
        edge.close()
    with broker_for(settings, lambda _m: None, client_id=coordinator_client_id(tmp_path)) as endpoint:
        resumed = MqttTransport(endpoint.coordinator).connect()
        try:
            resumed.subscribe(topics.update(run, client))
            message = wait_message(resumed, topics.update(run, client))
            assert isinstance(message, InboundMessage) and message.payload == b"sent while the coordinator was down"
        finally:
            resumed.close()
