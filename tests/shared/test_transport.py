"""The paho wrapper against real brokers (mosquitto and the embedded one)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from shared import codec, topics
from shared.broker import BrokerHandle, free_port
from shared.errors import (
    BrokerError,
    FieldTypeError,
    MalformedMessageError,
    MissingFieldError,
    OutgoingQueueFullError,
    PayloadTooLargeError,
    ProtocolError,
    TensorError,
    TopicError,
    UnknownMessageTypeError,
    VersionError,
)
from shared.protocol import MessageType, Presence
from shared.topics import TopicKind
from shared.transport import MqttTransport
from shared.transport_types import (
    ConnectionEvent,
    InboundMessage,
    TransportConfig,
    Will,
)
from tests.shared.helpers import connect, drain, wait_connected, wait_for, wait_message
from tests.shared.samples import SENDER, samples

TOPIC_OF: dict[MessageType, Callable[[str], str]] = {
    MessageType.HELLO: lambda run: topics.hello(run, SENDER),
    MessageType.ASSIGNMENT: lambda run: topics.assign(run, SENDER),
    MessageType.SCHEDULE: topics.schedule,
    MessageType.MANIFEST: lambda run: topics.manifest(run, "t12"),
    MessageType.CHUNK_REQUEST: lambda run: topics.chunkreq(run, SENDER),
    MessageType.CHUNK: lambda run: topics.chunk(run, SENDER),
    MessageType.GLOBAL_ADAPTER: topics.adapter,
    MessageType.UPDATE: lambda run: topics.update(run, SENDER),
    MessageType.PRESENCE: lambda run: topics.presence(run, SENDER),
    MessageType.NACK: lambda run: topics.nack(run, SENDER),
}


def test_every_message_type_round_trips_over_the_broker(
    any_broker: BrokerHandle, unique_id: Callable[[str], str]
) -> None:
    run = unique_id("run")
    receiver = connect(any_broker, unique_id("coord"))
    sender = connect(any_broker, unique_id("edge"))
    try:
        receiver.subscribe(f"{topics.run_prefix(run)}/#")
        bodies = samples()
        for msg_type, body in bodies.items():
            topic = TOPIC_OF[msg_type](run)
            info = topics.parse(topic)
            sender.publish(
                topic,
                codec.encode(msg_type, body, run=run, round=3, sender=SENDER),
                retain=info.kind in topics.RETAINED,
            )
        got = {}
        while len(got) < len(bodies):
            msg = wait_for(receiver, lambda e: isinstance(e, InboundMessage))
            _info, env = codec.decode_message(msg.topic, msg.payload, run=run)
            got[env.type] = env.body
        assert got == bodies
    finally:
        sender.close()
        receiver.close()


def test_large_message_passes_both_brokers(any_broker: BrokerHandle, unique_id: Callable[[str], str]) -> None:
    run = unique_id("run")
    a = connect(any_broker, unique_id("a"))
    try:
        topic = topics.chunk(run, "c")
        a.subscribe(topic)
        data = os.urandom(40 * 1024 * 1024)
        a.publish(topic, data)
        assert wait_message(a, topic, timeout=60).payload == data
    finally:
        a.close()


def _bad_payloads(run: str) -> list[tuple[bytes, type[ProtocolError]]]:
    hello = codec.encode(MessageType.HELLO, samples()[MessageType.HELLO], run=run, round=0, sender=SENDER)
    raw = msgpack.unpackb(hello)

    def variant(**changes: object) -> bytes:
        return msgpack.packb({**raw, **changes})

    body_missing = {k: v for k, v in raw["body"].items() if k != "num_examples"}
    update = msgpack.unpackb(
        codec.encode(MessageType.UPDATE, samples()[MessageType.UPDATE], run=run, round=0, sender=SENDER)
    )
    bad_tensor = msgpack.unpackb(msgpack.packb(update))
    next(iter(bad_tensor["body"]["delta"].values()))["dtype"] = "complex64"
    return [
        (b"\x00\x01garbage", MalformedMessageError),
        (hello[: len(hello) // 2], MalformedMessageError),
        (hello + b"\x00" * 70_000, ProtocolError),  # over the receiver's 64 KiB cap
        (variant(version="2.0"), VersionError),
        (variant(type="telemetry"), UnknownMessageTypeError),
        (variant(body=body_missing), MissingFieldError),
        (variant(round="three"), FieldTypeError),
        (variant(sender="someone-else"), TopicError),
        (msgpack.packb({**update, "type": "hello"}), MissingFieldError),
        (msgpack.packb(bad_tensor), TensorError),
        (msgpack.packb(update), TopicError),  # a valid update, but on a hello topic
    ]


def test_bad_input_gets_typed_errors_and_the_receiver_keeps_serving(
    any_broker: BrokerHandle, unique_id: Callable[[str], str]
) -> None:
    run = unique_id("run")
    receiver = connect(any_broker, unique_id("coord"))
    sender = connect(any_broker, unique_id("edge"))
    outcomes: list[object] = []

    def handle(msg: InboundMessage) -> None:
        try:
            outcomes.append(codec.decode_message(msg.topic, msg.payload, run=run, max_bytes=64 * 1024)[1].body)
        except ProtocolError as exc:
            outcomes.append(exc)

    try:
        topic = topics.hello(run, SENDER)
        receiver.subscribe(topics.all_of(run, TopicKind.HELLO), handle)
        bad = _bad_payloads(run)
        for payload, _ in bad:
            sender.publish(topic, payload)
        sender.publish(
            topic, codec.encode(MessageType.HELLO, samples()[MessageType.HELLO], run=run, round=0, sender=SENDER)
        )
        wait_for(receiver, lambda _e: len(outcomes) == len(bad) + 1)
        for (_, expected), outcome in zip(bad, outcomes, strict=False):
            assert isinstance(outcome, expected), (expected, outcome)
        assert isinstance(outcomes[0], MalformedMessageError) and isinstance(outcomes[2], PayloadTooLargeError)
        assert outcomes[-1] == samples()[MessageType.HELLO]  # still serving after all that
    finally:
        sender.close()
        receiver.close()


def test_bad_tensor_is_a_tensor_error(any_broker: BrokerHandle, unique_id: Callable[[str], str]) -> None:
    run = unique_id("run")
    t = connect(any_broker, unique_id("c"))
    try:
        topic = topics.update(run, SENDER)
        t.subscribe(topic)
        raw = msgpack.unpackb(
            codec.encode(MessageType.UPDATE, samples()[MessageType.UPDATE], run=run, round=0, sender=SENDER)
        )
        next(iter(raw["body"]["delta"].values()))["shape"] = [3, 3, 3]
        t.publish(topic, msgpack.packb(raw))
        msg = wait_message(t, topic)
        with pytest.raises(TensorError, match="needs"):
            codec.decode_message(msg.topic, msg.payload, run=run)
    finally:
        t.close()


def test_publish_refuses_oversize_before_sending(any_broker: BrokerHandle, unique_id: Callable[[str], str]) -> None:
    t = connect(any_broker, unique_id("c"), max_payload_bytes=1024)
    try:
        before = t.bytes_sent
        with pytest.raises(PayloadTooLargeError, match="over the 1024-byte limit"):
            t.publish("fedsoda/v1/x/chunk/c", b"\0" * 2000)
        assert t.bytes_sent == before
        topic = topics.chunk(unique_id("run"), "c")
        t.subscribe(topic)
        t.publish(topic, b"small")  # the connection is still fine
        assert wait_message(t, topic).payload == b"small"
        assert t.flush(5)
    finally:
        t.close()


def test_broker_maximum_packet_size_is_honoured(
    broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]
) -> None:
    broker = broker_factory("mosquitto", max_packet_bytes=64 * 1024)
    t = connect(broker, unique_id("c"))
    try:
        assert t.protocol == "5" and t.max_payload_bytes < 64 * 1024
        with pytest.raises(PayloadTooLargeError):
            t.publish("a/b", b"\0" * 64 * 1024)
    finally:
        t.close()


def test_broker_down_is_a_clear_error_after_a_bounded_wait() -> None:
    port = free_port()
    start = time.monotonic()
    with pytest.raises(BrokerError, match=f"127.0.0.1:{port} within 2 s.*ConnectionRefusedError"):
        MqttTransport(TransportConfig(port=port, client_id="lonely", connect_timeout=2.0)).connect()
    assert time.monotonic() - start < 5


def test_byte_accounting_counts_payload_and_topic(any_broker: BrokerHandle, unique_id: Callable[[str], str]) -> None:
    a = connect(any_broker, unique_id("a"))
    b = connect(any_broker, unique_id("b"))
    try:
        topic = topics.update(unique_id("run"), "c")
        b.subscribe(topic)
        sent0, recv0 = a.bytes_sent, b.bytes_received
        a.publish(topic, b"x" * 1000)
        wait_message(b, topic)
        assert a.bytes_sent - sent0 == 1000 + len(topic)
        assert b.bytes_received - recv0 == 1000 + len(topic)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("kind", ["mosquitto", "embedded"])
def test_reconnects_and_resubscribes_after_broker_restart(
    kind: str, broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]
) -> None:
    broker = broker_factory(kind)
    sub = connect(broker, unique_id("sub"), persistent=False)
    pub = connect(broker, unique_id("pub"), persistent=False)
    try:
        topic = topics.schedule(unique_id("run"))
        sub.subscribe(topic)
        broker.restart()
        assert wait_for(sub, lambda e: isinstance(e, ConnectionEvent) and not e.connected).connected is False
        event = wait_connected(sub)
        assert event.session_present is False
        wait_connected(pub)
        pub.publish(topic, b"after restart")
        assert wait_message(sub, topic).payload == b"after restart"
        assert sub.reconnects == 1
    finally:
        sub.close()
        pub.close()


def test_dropped_connection_reconnects_and_delivers_queued_publishes(
    any_broker: BrokerHandle, unique_id: Callable[[str], str]
) -> None:
    a = connect(any_broker, unique_id("a"))
    try:
        topic = topics.nack(unique_id("run"), "c")
        a.subscribe(topic)
        drain(a)
        a.drop_connection()
        wait_for(a, lambda e: isinstance(e, ConnectionEvent) and not e.connected)
        a.publish(topic, b"published while down")  # QoS 1: goes out after the reconnect
        assert wait_message(a, topic).payload == b"published while down"
        assert a.connected and a.flush(5)
    finally:
        a.close()


def test_persistent_session_queues_messages_for_an_absent_client(
    any_broker: BrokerHandle, unique_id: Callable[[str], str]
) -> None:
    client_id = unique_id("edge")
    topic = topics.assign(unique_id("run"), client_id)
    first = connect(any_broker, client_id)
    first.subscribe(topic)
    first.close()
    pub = connect(any_broker, unique_id("coord"))
    try:
        pub.publish(topic, b"while you were away")
        assert pub.flush(5)
        again = connect(any_broker, client_id)
        try:
            event = wait_connected(again)
            assert event.session_present is True
            assert wait_message(again, topic).payload == b"while you were away"
        finally:
            again.close()
    finally:
        pub.close()


def test_last_will_marks_the_client_offline(any_broker: BrokerHandle, unique_id: Callable[[str], str]) -> None:
    run = unique_id("run")
    client_id = unique_id("edge")
    topic = topics.presence(run, client_id)
    will_payload = codec.encode(
        MessageType.PRESENCE, Presence(client_id, False, "connection lost"), run=run, round=-1, sender=client_id
    )
    observer = connect(any_broker, unique_id("coord"))
    client = connect(any_broker, client_id, will=Will(topic, will_payload), keepalive=5)
    try:
        observer.subscribe(topics.all_of(run, TopicKind.PRESENCE))
        client.publish(
            topic,
            codec.encode(
                MessageType.PRESENCE, Presence(client_id, True, "connected"), run=run, round=-1, sender=client_id
            ),
            retain=True,
        )
        _, online = codec.decode_message(topic, wait_message(observer, topic).payload, run=run)
        assert online.body.online is True
        client.close(graceful=False)  # like a crash: no DISCONNECT, so the broker sends the will
        _, offline = codec.decode_message(topic, wait_message(observer, topic, timeout=20).payload, run=run)
        assert offline.body == Presence(client_id, False, "connection lost")
        # A clean close sends DISCONNECT, so the broker discards the will.
        polite = connect(any_broker, client_id, will=Will(topic, will_payload), keepalive=5)
        polite.close()
        observer.publish(topic, b"marker")  # anything the broker sent on the close arrives first
        assert wait_message(observer, topic).payload == b"marker"
    finally:
        observer.close()


def test_falls_back_to_mqtt_311(broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]) -> None:
    broker = broker_factory("embedded", mqtt_version=4)
    t = connect(broker, unique_id("old"))
    try:
        assert t.protocol == "3.1.1"
        topic = topics.hello(unique_id("run"), "c")
        t.subscribe(topic)
        t.publish(topic, b"hi")
        assert wait_message(t, topic).payload == b"hi"
    finally:
        t.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_pki(d: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=fedsoda-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make test certificates")
def test_credentials_and_mutual_tls(
    broker_factory: Callable[..., BrokerHandle], tmp_path: Path, unique_id: Callable[[str], str]
) -> None:
    _make_pki(tmp_path)
    broker = broker_factory(
        "mosquitto",
        users={"edge": "s3cret"},
        extra_config=[
            f"cafile {tmp_path / 'ca.pem'}",
            f"certfile {tmp_path / 'server.pem'}",
            f"keyfile {tmp_path / 'server.key'}",
            "require_certificate true",
        ],
    )
    tls = {"ca_file": tmp_path / "ca.pem", "cert_file": tmp_path / "client.pem", "key_file": tmp_path / "client.key"}
    t = connect(broker, unique_id("edge"), username="edge", password="s3cret", **tls)
    try:
        topic = topics.hello(unique_id("run"), "c")
        t.subscribe(topic)
        t.publish(topic, b"over tls")
        assert wait_message(t, topic).payload == b"over tls"
    finally:
        t.close()
    start = time.monotonic()
    with pytest.raises(BrokerError, match="refused"):
        connect(broker, unique_id("edge"), username="edge", password="wrong", **tls)
    assert time.monotonic() - start < 8  # a refusal is reported at once, not after the timeout
    with pytest.raises(BrokerError, match="within 2 s"):
        MqttTransport(
            TransportConfig(
                broker.host, broker.port, client_id="x", username="edge", password="s3cret", connect_timeout=2
            )
        ).connect()


def test_the_outgoing_queue_is_bounded_while_the_broker_is_away(
    broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str]
) -> None:
    broker = broker_factory("embedded")
    pub = connect(broker, unique_id("pub"), max_queued_bytes=100_000, queue_full_timeout=0.5)
    try:
        topic = topics.nack(unique_id("run"), "c")
        broker.kill()
        wait_for(pub, lambda e: isinstance(e, ConnectionEvent) and not e.connected)
        for i in range(2):
            pub.publish(topic, bytes([i]) * 40_000)  # QoS 1: queued for the reconnect, 80 KB of 100 KB
        started = time.monotonic()
        with pytest.raises(OutgoingQueueFullError, match=r"2 messages \(\d+ bytes\) still wait.*max_queued_bytes bound of 100000"):
            pub.publish(topic, b"one too many" * 4_000)
        assert 0.4 < time.monotonic() - started < 5.0  # it waited for room, then refused
        broker.start()
        wait_connected(pub)
        assert pub.flush(15.0)  # acknowledged after the reconnect: room again
        pub.publish(topic, b"after the reconnect")
        assert pub.flush(10.0)
        assert pub.messages_sent == 3
    finally:
        pub.close()
