"""What a transport hands its owner, and the seam the rest of fedsoda codes against.

:class:`TransportConfig` and :class:`Will` say how to reach and talk to the broker;
:class:`InboundMessage` and :class:`ConnectionEvent` are the events a transport queues; and
:class:`Transport` is the protocol the blob server and fetcher use, which
:class:`shared.transport.MqttTransport` implements over paho-mqtt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from shared.protocol import MAX_MESSAGE_BYTES


@dataclass(frozen=True)
class TransportConfig:
    """How to reach and talk to the broker.

    Attributes:
        host: Broker host.
        port: Broker port.
        client_id: Stable MQTT client id (persistent sessions are keyed by it).
        username: Optional user name.
        password: Optional password.
        ca_file: CA certificate (PEM) to verify the broker; enables TLS.
        cert_file: Client certificate (PEM) for mutual TLS.
        key_file: Client private key (PEM) for mutual TLS.
        keepalive: Seconds between pings; the broker declares us gone after 1.5x this.
        protocol: ``"auto"`` (v5, falling back to 3.1.1), ``"5"`` or ``"3.1.1"``.
        persistent: Keep the session (subscriptions and queued QoS 1 messages) across disconnects.
        session_expiry: Seconds a v5 broker keeps a persistent session after a disconnect.
        connect_timeout: Seconds :meth:`shared.transport.MqttTransport.connect` waits before a BrokerError.
        reconnect_min_delay: First reconnect delay in seconds.
        reconnect_max_delay: Cap on the exponential reconnect delay.
        max_payload_bytes: Largest payload this side publishes (further capped by the broker's
            v5 Maximum Packet Size).
        max_inflight: QoS 1 messages in flight at once.
        max_queued_bytes: Bytes of published messages the broker has not acknowledged yet
            (in flight, or queued while the link is down) that :meth:`publish` lets pile up;
            beyond it a publish waits for acknowledgements.
        queue_full_timeout: Seconds a publish waits for room before it raises
            :class:`~shared.errors.OutgoingQueueFullError`.
    """

    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = "fedsoda"
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: int = 30
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    persistent: bool = True
    session_expiry: int = 3600
    connect_timeout: float = 10.0
    reconnect_min_delay: float = 0.2
    reconnect_max_delay: float = 30.0
    max_payload_bytes: int = MAX_MESSAGE_BYTES
    max_inflight: int = 20
    max_queued_bytes: int = 512 * 1024 * 1024
    queue_full_timeout: float = 30.0


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes when the connection dies without a DISCONNECT.

    Attributes:
        topic: Will topic (fedsoda: the client's presence topic).
        payload: Will payload (an encoded offline Presence).
        qos: QoS of the will.
        retain: Retain it (presence is retained).
    """

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class InboundMessage:
    """A received MQTT message.

    Attributes:
        topic: Topic it arrived on.
        payload: Raw payload bytes (decode with :func:`shared.codec.decode_message`).
        qos: Delivery QoS.
        retain: Whether it was a retained message.
        received_at: ``time.monotonic()`` when it arrived.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    received_at: float


@dataclass(frozen=True)
class ConnectionEvent:
    """The connection came up or went down.

    A ``connected`` event is queued only once the broker has acknowledged the renewed
    subscriptions, so anything published after it reaches this client.

    Attributes:
        connected: True on (re)connect, False on loss.
        session_present: On connect: the broker still had our session.
        reason: Broker's reason string or what failed.
        protocol: ``"5"`` or ``"3.1.1"``.
    """

    connected: bool
    session_present: bool
    reason: str
    protocol: str


Event = InboundMessage | ConnectionEvent
Handler = Callable[[InboundMessage], object]


class Transport(Protocol):
    """The seam the rest of fedsoda codes against (MqttTransport implements it)."""

    client_id: str

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish bytes on a topic."""
        ...

    def subscribe(self, topic_filter: str, handler: Handler | None = None, *, qos: int = 1) -> None:
        """Subscribe and register a handler."""
        ...

    def remove_handler(self, topic_filter: str, handler: Handler) -> None:
        """Unregister a handler (the MQTT subscription stays)."""
        ...

    def poll(self, timeout: float | None = None) -> Event | None:
        """Take one event, dispatch it to handlers, return it."""
        ...
