"""The blob server over a real broker: bad chunk requests do not stop it serving; no client makes it send without bound."""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from shared import codec, topics
from shared.blob_server import BlobServer
from shared.broker import BrokerHandle
from shared.errors import BlobError
from shared.manifests import build_manifest
from shared.protocol import ChunkRequest, MessageType, Nack
from tests.shared.helpers import (
    COORDINATOR_KEY,
    connect,
    fetcher_for,
    folder_tree,
    serving,
    write_folder,
)


def test_server_keeps_serving_after_bad_requests(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = write_folder(tmp_path / "src", {"x.bin": os.urandom(10_000)})
    m = build_manifest(src, "pkg", 1, "t", chunk_size=4096)
    with serving(any_broker, run) as server:
        server.add(m, src)
        transport, fetcher = fetcher_for(any_broker, run, client, tmp_path / "cache")
        try:
            transport.publish(topics.chunkreq(run, client), b"\x93garbage")
            transport.publish(
                topics.chunkreq(run, client),
                codec.encode(
                    MessageType.CHUNK_REQUEST, ChunkRequest(m.blob_id, ["0" * 64]), run=run, round=-1, sender="impostor"
                ),
            )
            assert folder_tree(fetcher.fetch(m, timeout=60)) == {"x.bin": (src / "x.bin").read_bytes()}
            assert server.refused == Counter({"MalformedMessageError": 1, "TopicError": 1})
        finally:
            transport.close()


def _ask(transport, run: str, client: str, blob_id: str, hashes: list[str], times: int) -> None:
    """Publish the same chunk request ``times`` times, as the client."""
    payload = codec.encode(MessageType.CHUNK_REQUEST, ChunkRequest(blob_id, hashes), run=run, round=-1, sender=client)
    for _ in range(times):
        transport.publish(topics.chunkreq(run, client), payload)
    assert transport.flush(10.0)


def _collect(transport, run: str, client: str) -> tuple[list[bytes], list[Nack]]:
    """Record the chunks and nacks that reach the client (poll the transport to fill them)."""
    chunks: list[bytes] = []
    nacks: list[Nack] = []
    transport.subscribe(topics.chunk(run, client), lambda m: chunks.append(m.payload))
    transport.subscribe(topics.nack(run, client), lambda m: nacks.append(codec.decode_message(m.topic, m.payload, run=run)[1].body))
    return chunks, nacks


def _until(transport, condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        transport.poll(0.1)


def test_a_client_is_sent_at_most_budget_factor_times_a_package(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    """Asking for the same chunks again and again: ~100 KB of requests once made us send ~1 GB."""
    run, client = unique_id("run"), unique_id("edge")
    src = write_folder(tmp_path / "src", {"x.bin": os.urandom(10_000)})
    m = build_manifest(src, "pkg", 1, "t", chunk_size=4096)  # 3 chunks
    with serving(embedded_broker, run, budget_factor=3.0) as server:
        server.add(m, src)
        transport = connect(embedded_broker, client)
        try:
            chunks, nacks = _collect(transport, run, client)
            _ask(transport, run, client, m.blob_id, m.files[0].chunks, times=6)
            _until(transport, lambda: server.refused["budget_exceeded"] == 3 and len(chunks) == 9 and nacks)
            transport.poll(0.5)  # anything more would arrive now
        finally:
            transport.close()
    assert server.bytes_served == 3 * 10_000 and len(chunks) == 9
    # Every refusal is counted; the client is told once (a flood of requests gets no flood of nacks).
    assert [(n.code, "3x its 10000 bytes" in n.reason) for n in nacks] == [("budget_exceeded", True)]


def test_a_client_asking_too_often_is_refused_until_its_bucket_refills(
    embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = write_folder(tmp_path / "src", {"x.bin": os.urandom(4096)})
    m = build_manifest(src, "pkg", 1, "t", chunk_size=4096)
    now = [1000.0]
    with serving(embedded_broker, run, requests_per_second=2.0, request_burst=3, budget_factor=100.0,
                 clock=lambda: now[0]) as server:
        server.add(m, src)
        transport = connect(embedded_broker, client)
        try:
            chunks, nacks = _collect(transport, run, client)
            _ask(transport, run, client, m.blob_id, m.files[0].chunks, times=5)
            _until(transport, lambda: server.refused["rate_limited"] == 2 and len(chunks) == 3 and nacks)
            assert [n.code for n in nacks] == ["rate_limited"] and "2 chunk requests a second" in nacks[0].reason
            now[0] += 1.0  # two more requests' worth
            _ask(transport, run, client, m.blob_id, m.files[0].chunks, times=3)
            _until(transport, lambda: server.refused["rate_limited"] == 3 and len(chunks) == 5 and len(nacks) == 2)
        finally:
            transport.close()
    assert server.chunks_served == 5


def test_limits_must_be_positive() -> None:
    with pytest.raises(BlobError, match="budget_factor must be >= 1"):
        BlobServer(object(), run="r", signer=COORDINATOR_KEY, budget_factor=0.5)  # type: ignore[arg-type]


class AssignedTo(BlobServer):
    """Serves as the coordinator does: each request with the requesting client's tier (``t4`` here)."""

    def serve(self, client_id: str, request: ChunkRequest, **kwargs: object) -> int:
        return super().serve(client_id, request, tier="t4", **kwargs)  # type: ignore[arg-type]


def test_a_client_is_served_its_own_tier_only(embedded_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path) -> None:
    run, client = unique_id("run"), unique_id("edge")
    mine = build_manifest(write_folder(tmp_path / "t4", {"x.bin": os.urandom(4096)}), "pkg", 1, "t4", chunk_size=4096)
    other = build_manifest(write_folder(tmp_path / "t8", {"x.bin": os.urandom(4096)}), "pkg", 1, "t8", chunk_size=4096)
    with serving(embedded_broker, run, AssignedTo) as server:
        server.add(mine, tmp_path / "t4")
        server.add(other, tmp_path / "t8")
        transport = connect(embedded_broker, client)
        try:
            chunks, nacks = _collect(transport, run, client)
            _ask(transport, run, client, other.blob_id, other.files[0].chunks, times=1)
            _ask(transport, run, client, mine.blob_id, mine.files[0].chunks, times=1)
            _until(transport, lambda: len(chunks) == 1 and nacks)
        finally:
            transport.close()
    assert [n.code for n in nacks] == ["not_entitled"] and "assigned tier t4" in nacks[0].reason
    assert server.refused["not_entitled"] == 1 and server.chunks_served == 1
