"""Fetching blobs over real brokers: reuse, corrupt and repeated chunks, refusals, resuming."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.blob_fetcher import FetchProgress
from shared.blob_server import BlobServer
from shared.broker import BrokerHandle
from shared.chunkstore import ChunkStore
from shared.errors import BlobError
from shared.manifests import build_manifest
from shared.protocol import ChunkRequest
from tests.shared.helpers import fetcher_for, folder_tree, serving, write_folder

MiB = 1024 * 1024


class FaultyServer(BlobServer):
    """Serves like BlobServer but corrupts the first delivery of some chunks and repeats others.

    Stands in for a lossy network between broker and client; every message still travels
    through the real broker.
    """

    def __init__(
        self, *args: object, corrupt: set[str] = frozenset(), duplicate: set[str] = frozenset(), **kwargs: object
    ) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.corrupt_once = set(corrupt)
        self.duplicate = set(duplicate)
        self.served: Counter[str] = Counter()

    def read_chunk(self, digest: str) -> bytes:
        data = super().read_chunk(digest)
        self.served[digest] += 1
        if digest in self.corrupt_once:
            self.corrupt_once.discard(digest)
            return bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    def serve(self, client_id: str, request: ChunkRequest, **kwargs: object) -> int:
        served = super().serve(client_id, request, **kwargs)  # type: ignore[arg-type]
        repeat = [d for d in request.hashes if d in self.duplicate]
        if repeat:
            self.duplicate -= set(repeat)
            served += super().serve(client_id, ChunkRequest(request.blob_id, repeat), **kwargs)  # type: ignore[arg-type]
        return served


def test_transfer_reuse_and_shared_chunks(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    files = {f"layers/{i}.bin": os.urandom(150_000) for i in range(4)} | {"config.json": b'{"layers": 4}'}
    v1 = write_folder(tmp_path / "v1", files)
    m1 = build_manifest(v1, "pkg", 1, "t4", chunk_size=64 * 1024)
    changed = dict(files, **{"layers/2.bin": os.urandom(150_000)})  # one layer re-aligned
    v2 = write_folder(tmp_path / "v2", changed)
    m2 = build_manifest(v2, "pkg", 2, "t4", chunk_size=64 * 1024)
    progress: list[FetchProgress] = []
    with serving(any_broker, run) as server:
        server.add(m1, v1)
        server.add(m2, v2)
        transport, fetcher = fetcher_for(any_broker, run, client, tmp_path / "cache", window=3, progress=progress.append)
        try:
            dest = fetcher.fetch(m1, timeout=60)
            assert folder_tree(dest) == files and dest == tmp_path / "cache" / "blobs" / m1.blob_id
            assert (fetcher.stats.fetched, fetcher.stats.reused) == (13, 0)
            assert progress[-1].done_bytes == progress[-1].total_bytes == sum(map(len, files.values()))
            # Same blob again: nothing to fetch, not even the folder to rebuild.
            assert fetcher.fetch(m1) == dest and fetcher.stats.fetched == 0
            # Another destination: rebuilt from the cache alone.
            other = fetcher.fetch(m1, tmp_path / "elsewhere")
            assert folder_tree(other) == files and (fetcher.stats.fetched, fetcher.stats.reused) == (0, 13)
            # The re-aligned version costs only the changed layer's chunks.
            dest2 = fetcher.fetch(m2, timeout=60)
            assert folder_tree(dest2) == changed
            assert (fetcher.stats.fetched, fetcher.stats.reused) == (3, 10)
        finally:
            transport.close()


def test_corrupt_chunk_is_refetched_and_duplicate_ignored(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    files = {"a.bin": os.urandom(500_000), "b.bin": os.urandom(300_000)}
    src = write_folder(tmp_path / "src", files)
    m = build_manifest(src, "pkg", 1, "t", chunk_size=100_000)
    bad, dup = m.files[0].chunks[1], m.files[1].chunks[0]
    with serving(any_broker, run, FaultyServer, corrupt={bad}, duplicate={dup}) as server:
        server.add(m, src)
        transport, fetcher = fetcher_for(any_broker, run, client, tmp_path / "cache")
        try:
            dest = fetcher.fetch(m, timeout=60)
        finally:
            transport.close()
    assert folder_tree(dest) == files
    assert fetcher.stats.corrupt == 1 and fetcher.stats.requested.count(bad) == 2
    assert server.served[bad] == 2
    assert fetcher.stats.duplicates == 1 and fetcher.stats.fetched == 8


class RefusingServer(BlobServer):
    """Nacks the first ``refusals`` chunk requests (``unknown_chunk``) and serves after that."""

    def __init__(self, *args: object, refusals: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.refusals_left = refusals

    def serve(self, client_id: str, request: ChunkRequest, **kwargs: object) -> int:
        if self.refusals_left > 0:
            self.refusals_left -= 1
            self._nack(client_id, str(kwargs.get("ref_message_id", "")), -1, "unknown_chunk", "not now")
            return 0
        return super().serve(client_id, request, **kwargs)  # type: ignore[arg-type]


def test_a_refusal_pauses_the_fetch_then_it_asks_again_and_completes(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    files = {"x.bin": os.urandom(20_000)}
    src = write_folder(tmp_path / "src", files)
    m = build_manifest(src, "pkg", 1, "t", chunk_size=4096)
    with serving(any_broker, run, RefusingServer, refusals=2) as server:
        server.add(m, src)
        transport, fetcher = fetcher_for(any_broker, run, client, tmp_path / "cache", window=2, nack_backoff=0.2)
        try:
            assert folder_tree(fetcher.fetch(m, timeout=30)) == files
        finally:
            transport.close()
    assert fetcher.stats.refusals == 2 and fetcher.stats.re_requests >= 2
    assert server.refused["unknown_chunk"] == 2


def test_refusals_that_never_stop_end_the_fetch_within_its_attempts(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = write_folder(tmp_path / "src", {"x.bin": b"x" * 100})
    m = build_manifest(src, "pkg", 1, "t")
    with serving(any_broker, run) as server:
        transport, fetcher = fetcher_for(
            any_broker, run, client, tmp_path / "cache", max_attempts=3, nack_backoff=0.05, request_timeout=5.0
        )
        try:
            with pytest.raises(BlobError, match=r"still missing after 3 requests \(last refusal: unknown_blob"):
                fetcher.fetch(m, timeout=30)
            assert fetcher.stats.refusals == 3
            server.add(m, src)
            (src / "x.bin").write_bytes(b"y" * 101)  # the source changes after the manifest was added
            with pytest.raises(BlobError, match=r"last refusal: unknown_chunk: .*changed since its manifest"):
                fetcher.fetch(m, timeout=30)
        finally:
            transport.close()


class Crash(Exception):
    """Simulated client crash in the middle of a transfer."""


def test_300mb_blob_resumes_after_crash_and_connection_cut(
    broker_factory: Callable[..., BrokerHandle], unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    broker = broker_factory("mosquitto")
    run, client = unique_id("run"), unique_id("edge")
    src = tmp_path / "package"
    src.mkdir()
    for name, pieces in (("layers_0-9.bin", 40), ("layers_10-19.bin", 25), ("rest.bin", 12)):
        with (src / name).open("wb") as fh:
            for _ in range(pieces):
                fh.write(os.urandom(4 * MiB))
    (src / "config.json").write_text('{"model": "big"}')
    m = build_manifest(src, "big", 1, "t30")
    total = sum(len(f.chunks) for f in m.files)
    assert sum(f.size for f in m.files) > 300 * 10**6 and total == 78
    corrupt, duplicate = m.files[2].chunks[5], m.files[2].chunks[15]  # both land in the resumed part
    cache = tmp_path / "cache"

    with serving(broker, run, FaultyServer, corrupt={corrupt}, duplicate={duplicate}) as server:
        server.add(m, src)

        # 1) The client crashes after ~30% of the chunks.
        def crash_at_30(p: FetchProgress) -> None:
            if p.fetched >= 24:
                raise Crash

        transport, fetcher = fetcher_for(broker, run, client, cache, progress=crash_at_30)
        with pytest.raises(Crash):
            fetcher.fetch(m, timeout=120)
        transport.close(graceful=False)
        stored = {d for f in m.files for d in f.chunks if ChunkStore(cache).has(d)}
        assert 24 <= len(stored) < total

        # 2) It restarts; halfway through the rest the broker restarts (connection cut).
        cut: list[int] = []

        def cut_at_60(p: FetchProgress) -> None:
            if p.done_chunks >= 47 and not cut:
                cut.append(p.done_chunks)
                broker.restart()

        transport, fetcher = fetcher_for(broker, run, client, cache, progress=cut_at_60, request_timeout=10)
        try:
            dest = fetcher.fetch(m, timeout=180)
        finally:
            transport.close()
    assert cut and transport.reconnects == 1
    stats = fetcher.stats
    assert stats.reused == len(stored)
    assert stats.fetched == total - len(stored)  # only the missing chunks moved
    assert not set(stats.requested) & stored  # never asked for a chunk it had
    assert stats.corrupt == 1 and stats.duplicates >= 1
    assert server.served[corrupt] >= 2  # the corrupt copy, then a good one (maybe more after the cut)
    assert build_manifest(dest, "big", 1, "t30").blob_id == m.blob_id
