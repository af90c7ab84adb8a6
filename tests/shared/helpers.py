"""Helpers for broker tests: connected transports, queue-based waits (no bare sleeps) and blob transfers."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shared import codec, topics
from shared.blob_fetcher import BlobFetcher
from shared.blob_server import BlobServer
from shared.broker import BrokerHandle
from shared.chunkstore import ChunkStore
from shared.errors import ProtocolError
from shared.manifests import MARKER_NAME
from shared.signing import SigningKey
from shared.topics import TopicKind
from shared.transport import MqttTransport
from shared.transport_types import (
    ConnectionEvent,
    Event,
    InboundMessage,
    TransportConfig,
    Will,
)

COORDINATOR_KEY = SigningKey.from_seed(b"tests/shared coordinator key....")
"""The coordinator key of the blob-transfer tests: :func:`serving` signs with it, :func:`fetcher_for` pins it."""


def connect(broker: BrokerHandle, client_id: str, *, will: Will | None = None, **overrides: object) -> MqttTransport:
    """A connected transport to ``broker`` with fast reconnects (``overrides`` win)."""
    settings: dict[str, object] = {
        "connect_timeout": 10.0,
        "reconnect_min_delay": 0.1,
        "reconnect_max_delay": 1.0,
        **overrides,
    }
    config = TransportConfig(host=broker.host, port=broker.port, client_id=client_id, **settings)  # type: ignore[arg-type]
    return MqttTransport(config, will=will).connect()


def wait_for(transport: MqttTransport, predicate: Callable[[Event], bool], timeout: float = 15.0) -> Event:
    """Poll (dispatching to handlers) until an event satisfies ``predicate``.

    Raises:
        AssertionError: Nothing matched within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        event = transport.poll(min(left, 0.5))
        if event is not None and predicate(event):
            return event
    raise AssertionError(f"no matching event on {transport.client_id} within {timeout} s")


def wait_message(transport: MqttTransport, topic: str, timeout: float = 15.0) -> InboundMessage:
    """The next message on ``topic``."""
    event = wait_for(transport, lambda e: isinstance(e, InboundMessage) and e.topic == topic, timeout)
    assert isinstance(event, InboundMessage)
    return event


def wait_connected(transport: MqttTransport, timeout: float = 20.0) -> ConnectionEvent:
    """The next (re)connect event."""
    event = wait_for(transport, lambda e: isinstance(e, ConnectionEvent) and e.connected, timeout)
    assert isinstance(event, ConnectionEvent)
    return event


def drain(transport: MqttTransport) -> list[Event]:
    """Take every event already queued."""
    events = []
    while (event := transport.poll(0)) is not None:
        events.append(event)
    return events


def write_folder(root: Path, files: dict[str, bytes]) -> Path:
    """Create ``root`` holding ``files`` (relative posix path -> bytes); returns ``root``."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def folder_tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` but the blob marker: relative posix path -> bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


@contextmanager
def serving(
    broker: BrokerHandle, run: str, server_cls: type[BlobServer] = BlobServer, **kwargs: object
) -> Iterator[BlobServer]:
    """A coordinator loop thread: one transport, chunk requests dispatched to a BlobServer.

    Requests are decoded and handed to :meth:`BlobServer.serve` as the coordinator's handler
    does; one that does not decode is counted in ``server.refused`` under its error's class
    name (the coordinator's refusal counters, which it shares with its BlobServer).
    """
    transport = connect(broker, f"coord-{run}")
    kwargs.setdefault("signer", COORDINATOR_KEY)
    server = server_cls(transport, run=run, **kwargs)  # type: ignore[arg-type]

    def on_chunk_request(message: InboundMessage) -> None:
        try:
            info, envelope = codec.decode_message(message.topic, message.payload, run=run)
        except ProtocolError as exc:
            server.refused[type(exc).__name__] += 1
            return
        assert info.client is not None  # chunkreq topics are per-client
        server.serve(info.client, envelope.body, ref_message_id=envelope.message_id, round=envelope.round)

    transport.subscribe(topics.all_of(run, TopicKind.CHUNKREQ), on_chunk_request)
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        try:
            while not stop.is_set():
                transport.poll(0.1)
        except BaseException as exc:  # surfaced in the test below
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        stop.set()
        thread.join(10)
        transport.close()
        assert not errors, errors


def fetcher_for(
    broker: BrokerHandle, run: str, client: str, cache: Path, **kwargs: object
) -> tuple[MqttTransport, BlobFetcher]:
    """A connected client transport and a BlobFetcher on it with its chunk store in ``cache``.

    The fetcher pins :data:`COORDINATOR_KEY` unless ``kwargs`` pass another ``coordinator_key``.
    """
    transport = connect(broker, client)
    kwargs.setdefault("coordinator_key", COORDINATOR_KEY.public)
    return transport, BlobFetcher(transport, ChunkStore(cache), run=run, client_id=client, **kwargs)  # type: ignore[arg-type]
