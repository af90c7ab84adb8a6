"""A real mosquitto in authenticated mode, started the way ``serve --broker-mode mosquitto`` starts it.

Logins are checked (anonymous and wrong passwords are refused at once, with a message that
says to check the credentials), the ACL pins each client to its own topics (a publish as
another client gets PUBACK 0x87; another client's assignments and chunks never reach it),
no login can take over another's MQTT session, and the TLS listener of the README's worked
example refuses plaintext.
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from coordinator.run.brokers import BrokerEndpoint, broker_for
from coordinator.settings import BrokerSettings
from shared import topics
from shared.credentials import ClientCredentials
from shared.errors import BrokerError
from shared.transport import MqttTransport
from shared.transport_types import ConnectionEvent, InboundMessage, TransportConfig
from tests.security.conftest import Enrolled
from tests.shared.helpers import wait_message

NOT_AUTHORIZED = 0x87


def _login(endpoint: BrokerEndpoint, creds, *, client_id: str | None = None, **settings: object) -> MqttTransport:
    settings = {"connect_timeout": 10.0, "reconnect_min_delay": 0.1, "reconnect_max_delay": 1.0, **settings}
    config = TransportConfig(
        endpoint.host, endpoint.port, client_id=client_id or creds.client_id,
        username=creds.username, password=creds.password, **settings,  # type: ignore[arg-type]
    )
    return MqttTransport(config).connect()


def _coordinator(endpoint: BrokerEndpoint) -> MqttTransport:
    return MqttTransport(endpoint.coordinator).connect()


def _assert_coordinator_reaches_alice(coordinator: MqttTransport, alice: MqttTransport, run: str, payload: bytes) -> None:
    """The coordinator's assignment to alice arrives; closes both connections."""
    try:
        alice.subscribe(topics.assign(run, "alice"))
        coordinator.publish(topics.assign(run, "alice"), payload)
        assert wait_message(alice, topics.assign(run, "alice")).payload == payload
    finally:
        alice.close()
        coordinator.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
@pytest.mark.parametrize("login", [{}, {"username": "alice", "password": "not-her-password"}, {"username": "nobody", "password": "x"}])
def test_anonymous_and_wrong_logins_are_refused_at_once(secure_broker, login, protocol) -> None:
    endpoint = secure_broker()
    start = time.monotonic()
    config = TransportConfig(endpoint.host, endpoint.port, client_id="intruder", protocol=protocol, connect_timeout=10.0, **login)
    with pytest.raises(BrokerError, match=r"refused client 'intruder': Not authorized \(0x87\).*check the credentials"):
        MqttTransport(config).connect()
    assert time.monotonic() - start < 5, "a refusal is reported at once, not retried until the timeout"


def test_a_publish_on_another_clients_topic_is_refused_with_puback_0x87(secure_broker, enrolled: Enrolled, unique_id, caplog) -> None:
    endpoint = secure_broker()
    run = unique_id("run")
    coordinator = _coordinator(endpoint)
    try:
        coordinator.subscribe(topics.all_of(run, topics.TopicKind.UPDATE))
        # Raw paho (MQTT v5, QoS 1): the reason code of each PUBACK, by message id.
        acks: queue.SimpleQueue = queue.SimpleQueue()
        mallory = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mallory", protocol=mqtt.MQTTv5)
        mallory.username_pw_set(enrolled.mallory.username, enrolled.mallory.password)
        mallory.on_publish = lambda _c, _u, mid, rc, _p: acks.put((mid, rc.value))
        mallory.connect(endpoint.host, endpoint.port)
        mallory.loop_start()
        try:
            forged = mallory.publish(topics.update(run, "alice"), b"forged update", qos=1)
            own = mallory.publish(topics.update(run, "mallory"), b"own update", qos=1)
            got = dict(acks.get(timeout=10) for _ in range(2))
        finally:
            mallory.loop_stop()
            mallory.disconnect()
        assert got[forged.mid] == NOT_AUTHORIZED
        assert got[own.mid] == 0
        # Her own update arrives, the forged one never did (it was published first, same connection).
        assert wait_message(coordinator, topics.update(run, "mallory")).payload == b"own update"
        assert coordinator.next_message(timeout=0) is None

        # The transport surfaces the refusal with its reason code.
        with caplog.at_level(logging.WARNING, logger="shared.transport"):
            transport = _login(endpoint, enrolled.mallory)
            try:
                transport.publish(topics.update(run, "alice"), b"forged again")
                assert transport.flush(10)
            finally:
                transport.close()
        assert any("refused publish" in r.getMessage() and "0x87" in r.getMessage() for r in caplog.records)
    finally:
        coordinator.close()


def test_a_client_reads_only_its_own_assignments_and_chunks(secure_broker, enrolled: Enrolled, unique_id) -> None:
    endpoint = secure_broker()
    run = unique_id("run")
    coordinator, alice, mallory = _coordinator(endpoint), _login(endpoint, enrolled.alice), _login(endpoint, enrolled.mallory)
    try:
        # What mosquitto 2.0.11 does: it grants the subscriptions (SUBACK success, no error
        # raised here) and filters every message by the reader's ACL on delivery.
        for topic_filter in (topics.assign(run, "alice"), topics.chunk(run, "alice"), topics.nack(run, "alice"),
                             topics.all_of(run, topics.TopicKind.ASSIGN), topics.all_of(run, topics.TopicKind.UPDATE)):
            mallory.subscribe(topic_filter)
        for topic in (topics.assign(run, "alice"), topics.chunk(run, "alice")):
            alice.subscribe(topic)
        alice.publish(topics.update(run, "alice"), b"alice's delta")
        for topic in (topics.assign(run, "alice"), topics.chunk(run, "alice"), topics.nack(run, "alice")):
            coordinator.publish(topic, b"for alice only")
        coordinator.publish(topics.assign(run, "mallory"), b"for mallory")
        assert wait_message(alice, topics.chunk(run, "alice")).payload == b"for alice only"
        # Mallory's own message was published last by the same connection: had anything of
        # alice's been delivered to her, it would have arrived before it.
        seen = []
        while (event := mallory.poll(10)) is not None:
            if isinstance(event, InboundMessage):
                seen.append(event.topic)
                if event.topic == topics.assign(run, "mallory"):
                    break
        assert seen == [topics.assign(run, "mallory")]
    finally:
        for t in (coordinator, alice, mallory):
            t.close()


def test_no_login_can_take_over_another_clients_session(secure_broker, enrolled: Enrolled, unique_id) -> None:
    endpoint = secure_broker()
    run = unique_id("run")
    alice = _login(endpoint, enrolled.alice)
    # The broker replaces every MQTT client id with the login's user name.
    mallory = _login(endpoint, enrolled.mallory, client_id="alice")
    try:
        mallory.publish(topics.hello(run, "mallory"), b"hi")
        assert mallory.flush(10)
        alice.subscribe(topics.assign(run, "alice"))  # waits for the SUBACK: alice's link is up
        events = []
        while (event := alice.next_message(timeout=0)) is not None:
            events.append(event)
        assert not [e for e in events if isinstance(e, ConnectionEvent) and not e.connected]
        assert alice.connected and alice.reconnects == 0
    finally:
        alice.close()
        mallory.close()


def test_tls_worked_example_and_plaintext_to_the_tls_port_fails(secure_broker, enrolled: Enrolled, pki: Path, unique_id) -> None:
    endpoint = secure_broker(server_cert_file=str(pki / "server.pem"), server_key_file=str(pki / "server.key"))
    run = unique_id("run")
    coordinator = _coordinator(endpoint)  # on its loopback listener: the certificate need not name it
    alice = _login(endpoint, enrolled.alice, ca_file=pki / "ca.pem")
    _assert_coordinator_reaches_alice(coordinator, alice, run, b"over TLS")
    with pytest.raises(BrokerError, match="within 2 s.*if this port expects TLS, give the broker's CA certificate"):
        _login(endpoint, enrolled.alice, connect_timeout=2.0)
    with pytest.raises(BrokerError, match="refused client 'alice': Not authorized"):
        _login(endpoint, ClientCredentials("alice", "alice", "wrong"), ca_file=pki / "ca.pem")


def test_mutual_tls_requires_a_client_certificate_signed_by_the_ca(secure_broker, enrolled: Enrolled, pki: Path) -> None:
    endpoint = secure_broker(
        server_cert_file=str(pki / "server.pem"), server_key_file=str(pki / "server.key"),
        ca_file=str(pki / "ca.pem"), require_client_cert=True,
    )
    with pytest.raises(BrokerError, match="within 2 s"):
        _login(endpoint, enrolled.alice, ca_file=pki / "ca.pem", connect_timeout=2.0)
    alice = _login(endpoint, enrolled.alice, ca_file=pki / "ca.pem", cert_file=pki / "client.pem", key_file=pki / "client.key")
    alice.close()
    _coordinator(endpoint).close()


def test_your_own_mosquitto_on_the_generated_files(broker_factory, enrolled: Enrolled, unique_id) -> None:
    # What README tells a user who runs mosquitto themselves: these files, this listener option.
    own = broker_factory("mosquitto", password_file=enrolled.store.passwd_file, acl_file=enrolled.store.acl_file,
                         username_as_client_id=True)
    settings = BrokerSettings(mode="external", host=own.host, port=own.port, credentials_dir=str(enrolled.store.directory))
    run = unique_id("run")
    with broker_for(settings, lambda _m: None) as endpoint:
        assert endpoint.coordinator.username == "coordinator"
        coordinator, alice = _coordinator(endpoint), _login(endpoint, enrolled.alice)
        _assert_coordinator_reaches_alice(coordinator, alice, run, b"hello alice")
    with pytest.raises(BrokerError, match="Not authorized"):
        MqttTransport(TransportConfig(own.host, own.port, client_id="coordinator", connect_timeout=5.0)).connect()


def test_a_client_enrolled_while_the_broker_starts_gets_in(secure_broker, enrolled: Enrolled, monkeypatch) -> None:
    """An ``add`` that lands after mosquitto read its files but before ``serve`` noted the broker
    (so ``add`` had no one to signal) is picked up: ``serve`` sees the change and signals it."""
    import coordinator.run.brokers as brokers

    late: list[ClientCredentials] = []
    real_start = brokers.start_mosquitto

    def start_then_enrol(**kwargs: object):
        handle = real_start(**kwargs)
        late.append(enrolled.store.add("late-device"))  # the race window, made certain
        return handle

    monkeypatch.setattr(brokers, "start_mosquitto", start_then_enrol)
    endpoint = secure_broker()
    deadline = time.monotonic() + 10
    while True:  # mosquitto applies a SIGHUP asynchronously: retry the login for a moment
        try:
            _login(endpoint, late[0], connect_timeout=2.0).close()
            break
        except BrokerError:
            assert time.monotonic() < deadline, "the late enrolment never reached the broker"
            time.sleep(0.2)
