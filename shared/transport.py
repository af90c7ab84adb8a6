"""A small wrapper over paho-mqtt 2.x (callback API v2) for fedsoda's processes.

Design:

- One network thread per transport runs paho's ``loop()`` and reconnects after a loss with
  exponential backoff and jitter (paho's own reconnect has no jitter, so a broker restart
  would see every client return in the same instant).
- paho callbacks only put events on a queue (or set flags); nothing blocks in them. The
  owner's single loop thread drains the queue with :meth:`MqttTransport.next_message` or
  :meth:`MqttTransport.poll` (which also calls the handlers registered with
  :meth:`MqttTransport.subscribe`).
- MQTT v5 where the broker has it, else 3.1.1 (``protocol="auto"``). Sessions are
  persistent (v5: clean_start false + session expiry; 3.1.1: clean_session false), so QoS 1
  messages published while a client was away reach it when it returns; subscriptions are
  renewed whenever the broker has lost the session.
- :meth:`MqttTransport.publish` refuses a payload over the size limit before sending it:
  paho would otherwise re-send an oversize QoS 1 message on every reconnect, forever.
- The outgoing queue is bounded: once the messages the broker has not acknowledged hold
  ``max_queued_bytes``, a publish waits for acknowledgements (backpressure) and, after
  ``queue_full_timeout``, raises :class:`~shared.errors.OutgoingQueueFullError` rather than
  letting paho's queue grow with whatever the caller publishes.
- Bytes sent and received (payload + topic) are counted for the resource report.

The connection settings, the events and the :class:`~shared.transport_types.Transport`
protocol this class implements live in :mod:`shared.transport_types`. This module is over
450 lines because it is one class: the link, subscription and acknowledgement state it keeps
is shared between the owner's thread and paho's callbacks under the same locks, and spreading
that state over several modules would only make the locking harder to follow.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.errors import BrokerError, OutgoingQueueFullError, PayloadTooLargeError
from shared.transport_types import (
    ConnectionEvent,
    Event,
    Handler,
    InboundMessage,
    TransportConfig,
    Will,
)

log = logging.getLogger(__name__)

_PACKET_OVERHEAD = 16
"""Fixed header (<= 5), topic length (2), packet id (2) and v5 property length, rounded up."""


def _no_op(*_args: object) -> None:
    """Socket-write registration hook: our network thread selects on the socket itself."""


@dataclass
class _Backoff:
    """Exponential backoff with jitter: each delay is uniform in [d/2, d], d doubling to a cap."""

    minimum: float
    maximum: float
    attempt: int = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.minimum * (2 ** min(self.attempt, 30)))
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


@dataclass
class _Subscription:
    qos: int
    handlers: list[Handler] = field(default_factory=list)


_AUTH_REFUSALS = frozenset({0x86, 0x87})
"""CONNACK Bad user name or password / Not authorized (paho maps 3.1.1's codes 4 and 5 onto them)."""


def _refusal_text(reason_code: object) -> str:
    """A refused CONNACK in words a user can act on."""
    value = getattr(reason_code, "value", None)
    if value in _AUTH_REFUSALS:
        return (
            f"{reason_code} (0x{value:02X}): the broker does not accept this user name and password, or this "
            "user may not connect (revoked?); check the credentials"
        )
    return str(reason_code)


class MqttTransport:
    """paho-mqtt client with a network thread, reconnects, size checks and an event queue.

    Typical use::

        t = MqttTransport(TransportConfig(host, port, client_id="edge-1"), will=Will(...))
        t.connect()                                  # BrokerError after connect_timeout
        t.subscribe(topics.assign(run, "edge-1"), on_assignment)
        while running:
            t.poll(0.5)                              # calls on_assignment in this thread
        t.close()

    Args:
        config: Where and how to connect.
        will: Last Will, if any.
    """

    def __init__(self, config: TransportConfig, *, will: Will | None = None) -> None:
        self.config = config
        self.client_id = config.client_id
        self.will = will
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._subs: dict[str, _Subscription] = {}
        self._subs_lock = threading.Lock()
        self._protocol = MQTTProtocolVersion.MQTTv311 if config.protocol == "3.1.1" else MQTTProtocolVersion.MQTTv5
        self._client: mqtt.Client | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closing = False
        self._connected = threading.Event()
        self._ever_connected = False
        self._awaiting_connack = False
        self._refused: str | None = None
        self._last_error = "no attempt yet"
        self._backoff = _Backoff(config.reconnect_min_delay, config.reconnect_max_delay)
        self._broker_max_packet: int | None = None
        self._ack_lock = threading.Lock()
        self._ack_cond = threading.Condition(self._ack_lock)
        self._unacked: dict[int, int] = {}  # mid -> bytes, until the broker acknowledges it
        self._queued_bytes = 0
        self._early_acks: set[int] = set()
        self._suback_waiters: dict[int, tuple[threading.Event, list[str]]] = {}
        self._early_subacks: dict[int, str] = {}
        self._sent_filters: set[str] = set()
        self._resubscribing: set[int] = set()
        self._connack = ConnectionEvent(False, False, "not connected yet", "5")
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self.reconnects = 0

    # ------------------------------------------------------------------ state

    @property
    def connected(self) -> bool:
        """Whether the link is up and every registered subscription is active at the broker."""
        return self._connected.is_set()

    @property
    def protocol(self) -> str:
        """``"5"`` or ``"3.1.1"`` (settled after the first successful connect)."""
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    @property
    def max_payload_bytes(self) -> int:
        """Largest payload :meth:`publish` accepts for a short topic."""
        limit = self.config.max_payload_bytes
        if self._broker_max_packet is not None:
            limit = min(limit, self._broker_max_packet - _PACKET_OVERHEAD)
        return limit

    # ------------------------------------------------------------- lifecycle

    def connect(self, timeout: float | None = None) -> MqttTransport:
        """Start the network thread and wait for the broker to accept us.

        Args:
            timeout: Seconds to wait; default ``config.connect_timeout``.

        Returns:
            self, connected.

        Raises:
            BrokerError: No broker answered in time, or it refused us (bad credentials,
                unsupported protocol, TLS failure); the message says which.
        """
        if self._thread is not None:
            raise BrokerError("transport already started; create a new one to reconnect from scratch")
        wait = self.config.connect_timeout if timeout is None else timeout
        self._client = self._make_client(self._protocol)
        self._thread = threading.Thread(target=self._network_main, name=f"mqtt-{self.client_id}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + wait
        while not self._connected.wait(0.05):
            if self._refused is not None:
                reason = self._refused
                self.close(graceful=False)
                raise BrokerError(
                    f"broker {self.config.host}:{self.config.port} refused client {self.client_id!r}: {reason}"
                )
            if time.monotonic() > deadline:
                last = self._last_error
                self.close(graceful=False)
                hint = "start one (python -m shared.embedded_broker) or check host, port and TLS settings"
                if self.config.ca_file is None and last.startswith("connection closed before CONNACK"):
                    # What a TLS listener does with a plaintext CONNECT.
                    hint = "the broker hung up without answering: if this port expects TLS, give the broker's CA certificate (ca_file)"
                raise BrokerError(
                    f"no MQTT broker accepted us at {self.config.host}:{self.config.port} within {wait:.0f} s "
                    f"(last error: {last}); {hint}"
                )
        return self

    def close(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Disconnect and stop the network thread. Safe to call twice.

        Args:
            graceful: Send DISCONNECT (the broker discards the Last Will) after waiting up to
                ``timeout`` for unacknowledged QoS 1 publishes. False drops the socket like a
                crash, so the broker publishes the Last Will.
            timeout: Seconds to wait for pending publishes and the thread.
        """
        if self._thread is None:
            return
        client = self._client
        connected = self.connected
        if graceful and connected:
            self.flush(timeout)
        self._closing = True
        if client is not None:
            if graceful:
                client.disconnect()  # the network thread writes it, then paho closes the socket
            else:
                self._shutdown_socket()
        if connected:
            # Let the thread finish writing DISCONNECT: stopping it first would drop the socket
            # unannounced, and the broker would publish our Last Will.
            self._thread.join(timeout)
        self._stop.set()  # wakes a thread asleep between reconnect attempts
        self._thread.join(timeout)
        self._thread = None
        self._connected.clear()

    def drop_connection(self) -> None:
        """Cut the TCP connection abruptly, as a network fault would; the transport reconnects.

        For fault-injection tests and demos.
        """
        self._shutdown_socket()

    def _shutdown_socket(self) -> None:
        client = self._client
        sock = client.socket() if client is not None else None
        if isinstance(sock, socket.socket):  # an ssl.SSLSocket is one too
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> MqttTransport:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ publishing

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Publish bytes; QoS 1 messages published while the link is down go out on reconnect.

        Args:
            topic: Topic (no wildcards).
            payload: Bytes to send (empty clears a retained message).
            qos: 0 or 1 (fedsoda uses 1).
            retain: Broker keeps it for future subscribers.

        Raises:
            PayloadTooLargeError: Over :attr:`max_payload_bytes` (refused before sending).
            OutgoingQueueFullError: The unacknowledged messages held ``max_queued_bytes`` for
                ``queue_full_timeout`` seconds (never raised in a paho callback: none publishes).
            BrokerError: Never connected, closed, or paho refused the publish.
        """
        if not self._ever_connected or self._closing or self._client is None:
            raise BrokerError(f"cannot publish on {topic!r}: transport is not connected (call connect() first)")
        topic_bytes = len(topic.encode())
        limit = self.max_payload_bytes
        if len(payload) + topic_bytes > limit:
            raise PayloadTooLargeError(
                f"refusing to publish {len(payload)} bytes on {topic!r}: over the {limit}-byte limit "
                "(broker maximum packet size or max_payload_bytes); send it as a chunked blob or raise the limit"
            )
        size = len(payload) + topic_bytes
        self._wait_for_room(topic, size)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise BrokerError(f"publish on {topic!r} failed: {mqtt.error_string(info.rc)}")
        # paho calls on_publish for every message (QoS 0 once written), maybe before we get here.
        registered = qos > 0 or info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS  # QoS 0 while down: dropped
        with self._ack_lock:
            if not registered:
                pass
            elif info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._unacked[info.mid] = size
                self._queued_bytes += size
        self.bytes_sent += size
        self.messages_sent += 1

    def _wait_for_room(self, topic: str, size: int) -> None:
        """Backpressure: wait while the unacknowledged messages hold ``max_queued_bytes``.

        An empty queue always takes the message, so one publish larger than the bound goes out.
        """
        limit = self.config.max_queued_bytes
        deadline = time.monotonic() + self.config.queue_full_timeout
        with self._ack_cond:
            while self._unacked and self._queued_bytes + size > limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutgoingQueueFullError(
                        f"cannot publish {size} bytes on {topic!r}: {len(self._unacked)} messages "
                        f"({self._queued_bytes} bytes) still wait for the broker's acknowledgement, the "
                        f"max_queued_bytes bound of {limit}, after waiting {self.config.queue_full_timeout:g} s; "
                        "the link is down or slower than what is being published"
                    )
                self._ack_cond.wait(min(left, 0.5))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every QoS 1 message published so far is acknowledged by the broker.

        Args:
            timeout: Seconds to wait.

        Returns:
            True if all were acknowledged.
        """
        deadline = time.monotonic() + timeout
        with self._ack_cond:
            while self._unacked:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._ack_cond.wait(min(left, 0.5))
        return True

    # ----------------------------------------------------------- subscribing

    def subscribe(
        self, topic_filter: str, handler: Handler | None = None, *, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Subscribe (renewed on every reconnect that lost the session) and register a handler.

        When connected, waits for the broker's SUBACK so a publish that follows is seen.

        Args:
            topic_filter: Topic or filter with ``+`` / ``#``.
            handler: Called by :meth:`poll` in the owner's thread for each matching message.
            qos: Subscription QoS.
            timeout: Seconds to wait for the SUBACK.

        Raises:
            BrokerError: The broker refused the subscription or did not answer in time.
        """
        with self._subs_lock:
            sub = self._subs.get(topic_filter)
            new = sub is None or sub.qos != qos
            if sub is None:
                sub = self._subs[topic_filter] = _Subscription(qos)
            sub.qos = qos
            if handler is not None and handler not in sub.handlers:
                sub.handlers.append(handler)
        if new and self.connected:
            self._send_subscribe(topic_filter, qos, timeout)

    def _send_subscribe(self, topic_filter: str, qos: int, timeout: float) -> None:
        client = self._client
        assert client is not None
        done = threading.Event()
        outcome: list[str] = []
        # No lock of ours is held across paho calls: its network thread holds paho's locks
        # while it runs our callbacks, which take ours.
        rc, mid = client.subscribe(topic_filter, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # the link just dropped; on_connect sends the subscription again
        with self._ack_lock:
            self._sent_filters.add(topic_filter)
            early = self._early_subacks.pop(mid, None)
            if early is None:
                self._suback_waiters[mid] = (done, outcome)
            else:
                outcome.append(early)
                done.set()
        if not done.wait(timeout):
            with self._ack_lock:
                self._suback_waiters.pop(mid, None)
            if self.connected:
                raise BrokerError(f"broker did not acknowledge the subscription to {topic_filter!r} in {timeout:.0f} s")
            return
        if outcome and outcome[0]:
            raise BrokerError(f"broker refused the subscription to {topic_filter!r}: {outcome[0]}")

    def remove_handler(self, topic_filter: str, handler: Handler) -> None:
        """Unregister a handler; the MQTT subscription stays (use :meth:`unsubscribe`).

        Args:
            topic_filter: The filter it was registered for.
            handler: The handler.
        """
        with self._subs_lock:
            sub = self._subs.get(topic_filter)
            if sub is not None and handler in sub.handlers:
                sub.handlers.remove(handler)

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop a subscription and its handlers.

        Args:
            topic_filter: The filter.
        """
        with self._subs_lock:
            self._subs.pop(topic_filter, None)
        with self._ack_lock:
            self._sent_filters.discard(topic_filter)
        if self._client is not None and self.connected:
            self._client.unsubscribe(topic_filter)

    # --------------------------------------------------------------- events

    def next_message(self, timeout: float | None = None) -> Event | None:
        """Take the next event without dispatching it.

        Args:
            timeout: Seconds to wait; None waits forever, 0 does not wait.

        Returns:
            An :class:`InboundMessage` or :class:`ConnectionEvent`, or None on timeout.
        """
        try:
            if timeout is not None and timeout <= 0:
                return self._events.get_nowait()
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def poll(self, timeout: float | None = None) -> Event | None:
        """Take the next event and call the handlers whose filter matches it.

        Handler exceptions propagate to the caller: handlers catch the errors they can
        survive (bad input) themselves.

        Args:
            timeout: Seconds to wait; None waits forever, 0 does not wait.

        Returns:
            The event, or None on timeout.
        """
        event = self.next_message(timeout)
        if isinstance(event, InboundMessage):
            for handler in self.handlers_for(event.topic):
                handler(event)
        return event

    def handlers_for(self, topic: str) -> list[Handler]:
        """Handlers registered for filters that match ``topic``.

        Args:
            topic: A concrete topic.

        Returns:
            The handlers, in registration order of their filters.
        """
        with self._subs_lock:
            return [h for flt, sub in self._subs.items() if mqtt.topic_matches_sub(flt, topic) for h in sub.handlers]

    # ------------------------------------------------------- network thread

    def _make_client(self, protocol: MQTTProtocolVersion) -> mqtt.Client:
        cfg = self.config
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            clean_session=(not cfg.persistent) if protocol != mqtt.MQTTv5 else None,
            protocol=protocol,
            reconnect_on_failure=False,
        )
        client.max_inflight_messages_set(cfg.max_inflight)
        client.max_queued_messages_set(0)
        if cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if cfg.ca_file is not None:
            client.tls_set(
                ca_certs=str(cfg.ca_file),
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if self.will is not None:
            client.will_set(self.will.topic, self.will.payload, qos=self.will.qos, retain=self.will.retain)
        # Without these, paho writes a publish inline in the caller's thread whenever it runs
        # no loop_start() thread of its own, racing our network thread on the socket and
        # interleaving two large packets (the broker then drops us for a malformed packet).
        # With them set, every write happens in our network thread's loop().
        client.on_socket_register_write = _no_op
        client.on_socket_unregister_write = _no_op
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_subscribe = self._on_subscribe
        kwargs: dict = {}
        if protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = cfg.session_expiry if cfg.persistent else 0
            kwargs = {"clean_start": not cfg.persistent, "properties": props}
        client.connect_async(cfg.host, cfg.port, cfg.keepalive, **kwargs)
        return client

    def _network_main(self) -> None:
        socket_up = False
        while not self._stop.is_set():
            client = self._client
            assert client is not None
            if not socket_up:
                if self._closing:
                    break
                try:
                    client.reconnect()
                    socket_up = True
                    self._awaiting_connack = True
                except (OSError, ssl.SSLError) as exc:
                    self._last_error = f"{type(exc).__name__}: {exc}"
                    self._stop.wait(self._backoff.next())
                    continue
            rc = client.loop(timeout=0.2)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
                continue
            socket_up = False
            if self._closing:
                break
            if self._awaiting_connack:
                self._last_error = f"connection closed before CONNACK ({mqtt.error_string(rc)})"
                self._maybe_fall_back()
            self._stop.wait(self._backoff.next())
        sock = self._client.socket() if self._client is not None else None
        if isinstance(sock, socket.socket):
            sock.close()

    def _maybe_fall_back(self) -> None:
        """In auto mode before any success, alternate v5 and 3.1.1 (a 3.1.1-only broker drops v5)."""
        if self.config.protocol != "auto" or self._ever_connected or self._refused is not None:
            return
        v5, v311 = MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311
        self._protocol = v311 if self._protocol == v5 else v5
        log.info(
            "broker did not accept MQTT %s; trying %s", "3.1.1" if self._protocol == mqtt.MQTTv5 else "5", self.protocol
        )
        self._client = self._make_client(self._protocol)

    # paho callbacks: run in the network thread, must never block.

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        self._awaiting_connack = False
        if reason_code.is_failure:
            text = str(reason_code)
            if "protocol" in text.lower() and self.config.protocol == "auto" and not self._ever_connected:
                self._last_error = f"broker refused MQTT {self.protocol}: {text}"
                self._maybe_fall_back()
                return
            self._refused = _refusal_text(reason_code)
            self._last_error = f"refused: {self._refused}"
            if self._ever_connected:  # no connect() call to raise in: say it, keep retrying with backoff
                log.error("broker %s:%s refused to reconnect %s: %s", self.config.host, self.config.port, self.client_id, self._refused)
            return
        max_packet = getattr(properties, "MaximumPacketSize", None) if properties is not None else None
        self._broker_max_packet = int(max_packet) if max_packet else None
        if self._ever_connected:
            self.reconnects += 1
        self._ever_connected = True
        self._backoff.reset()
        with self._ack_lock:
            if not flags.session_present:
                self._sent_filters.clear()
        self._connack = ConnectionEvent(True, bool(flags.session_present), str(reason_code), self.protocol)
        mids = self._subscribe_missing(client)
        with self._ack_lock:
            self._resubscribing = mids
        if not mids:
            self._announce_connected(client)

    def _subscribe_missing(self, client: mqtt.Client) -> set[int]:
        """Send SUBSCRIBE for registered filters the broker's session lacks; return their mids."""
        with self._subs_lock:
            filters = [(flt, sub.qos) for flt, sub in self._subs.items()]
        with self._ack_lock:
            todo = [(flt, qos) for flt, qos in filters if flt not in self._sent_filters]
            self._sent_filters.update(flt for flt, _ in todo)
        mids = set()
        for flt, qos in todo:
            rc, mid = client.subscribe(flt, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                mids.add(mid)
        return mids

    def _announce_connected(self, client: mqtt.Client) -> None:
        """Mark the link usable only once renewed subscriptions are acknowledged.

        Otherwise a message published right after the ConnectionEvent could reach the broker
        before our SUBSCRIBE and be lost to us.
        """
        self._connected.set()
        # A subscribe() that raced the renewal saw "not connected" and left its filter to us.
        self._subscribe_missing(client)
        event = self._connack
        self._events.put(event)
        log.info(
            "connected to %s:%s as %s (MQTT %s, session present: %s)",
            self.config.host,
            self.config.port,
            self.client_id,
            self.protocol,
            event.session_present,
        )

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        was_connected = self._connected.is_set()
        self._connected.clear()
        with self._ack_lock:
            self._resubscribing = set()
        if was_connected:
            self._events.put(ConnectionEvent(False, False, str(reason_code), self.protocol))
            if not self._closing:
                log.warning("lost the broker connection (%s); reconnecting", reason_code)

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        payload = message.payload
        self.bytes_received += len(payload) + len(message.topic.encode())
        self.messages_received += 1
        self._events.put(InboundMessage(message.topic, payload, message.qos, bool(message.retain), time.monotonic()))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # noqa: ANN001
        if reason_code.is_failure:
            log.warning("broker refused publish (mid %s): %s (reason code 0x%02X)", mid, reason_code, reason_code.value)
        with self._ack_cond:
            size = self._unacked.pop(mid, None)
            if size is not None:
                self._queued_bytes -= size
                self._ack_cond.notify_all()
            else:
                self._early_acks.add(mid)

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # noqa: ANN001
        failures = "; ".join(str(rc) for rc in reason_codes if rc.is_failure)
        if failures:
            log.warning("broker refused a subscription: %s", failures)
        with self._ack_lock:
            renewal = mid in self._resubscribing
            self._resubscribing.discard(mid)
            renewal_done = renewal and not self._resubscribing
            waiter = self._suback_waiters.pop(mid, None)
            if waiter is None and not renewal:
                # subscribe() registers its waiter after paho returns the mid: the SUBACK may win.
                if len(self._early_subacks) > 1000:  # SUBACKs nobody waits for (late renewals)
                    self._early_subacks.clear()
                self._early_subacks[mid] = failures
        if renewal_done:
            self._announce_connected(client)
        if waiter is None:
            return
        done, outcome = waiter
        outcome.append(failures)
        done.set()
