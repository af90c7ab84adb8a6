"""Chunked, content-addressed, resumable folder transfer over real brokers."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from shared import codec, topics
from shared.blobs import (
    MARKER_NAME,
    BlobFetcher,
    BlobServer,
    ChunkStore,
    FetchProgress,
    build_manifest,
    compute_blob_id,
    validate_manifest,
)
from shared.broker import BrokerHandle
from shared.errors import BlobError, ChunkHashMismatchError, UnsafePathError
from shared.protocol import ChunkRequest, FileEntry, Manifest, MessageType
from shared.topics import TopicKind
from shared.transport import MqttTransport
from tests.shared.helpers import connect

MiB = 1024 * 1024


def _write_folder(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER_NAME
    }


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


@contextmanager
def serving(
    broker: BrokerHandle, run: str, server_cls: type[BlobServer] = BlobServer, **kwargs: object
) -> Iterator[BlobServer]:
    """A coordinator loop thread: one transport, chunk requests dispatched to a BlobServer."""
    transport = connect(broker, f"coord-{run}")
    server = server_cls(transport, run=run, **kwargs)  # type: ignore[arg-type]
    transport.subscribe(topics.all_of(run, TopicKind.CHUNKREQ), server.handle)
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


# ------------------------------------------------------------------ manifests


def test_manifest_lists_files_and_chunks(tmp_path: Path) -> None:
    files = {
        "config.json": b"{}",
        "empty.bin": b"",
        "layers/l0.safetensors": os.urandom(3 * 1000),  # exactly 3 chunks
        "layers/l1.safetensors": os.urandom(2500),
    }
    folder = _write_folder(tmp_path / "pkg", files)
    (folder / MARKER_NAME).write_text("from an earlier fetch")  # never part of a manifest
    m = build_manifest(folder, "m", 1, "t8", {"layer_map": [0, 3]}, chunk_size=1000)
    assert [f.path for f in m.files] == sorted(files)
    sizes = {f.path: (f.size, len(f.chunks)) for f in m.files}
    assert sizes == {
        "config.json": (2, 1),
        "empty.bin": (0, 0),
        "layers/l0.safetensors": (3000, 3),
        "layers/l1.safetensors": (2500, 3),
    }
    l1 = files["layers/l1.safetensors"]
    assert m.files[3].chunks[2] == hashlib.sha256(l1[2000:]).hexdigest()
    validate_manifest(m)
    # Identity is the content: same files under another name and version keep the blob id.
    assert build_manifest(folder, "other", 9, "t12", chunk_size=1000).blob_id == m.blob_id
    (folder / "config.json").write_bytes(b"{ }")
    assert build_manifest(folder, "m", 1, "t8", chunk_size=1000).blob_id != m.blob_id


def test_symlinked_directory_is_refused(tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "pkg", {"a.txt": b"a"})
    outside = _write_folder(tmp_path / "outside", {"secret": b"s"})
    (folder / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="symlinked directory"):
        build_manifest(folder, "m", 1, "t")


def _manifest_with(paths: list[str]) -> Manifest:
    files = [FileEntry(path=p, size=1, chunks=["a" * 64]) for p in paths]
    return Manifest(compute_blob_id(files, 4), "m", 1, "t", 4, files, {})


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "../escape", "a/../../b", "a//b", "./a", "a/.", "C:/windows", "a\\b", "", "a\x00b", MARKER_NAME],
)
def test_unsafe_manifest_paths_raise(path: str) -> None:
    with pytest.raises(UnsafePathError):
        validate_manifest(_manifest_with([path]))


def test_colliding_paths_raise() -> None:
    with pytest.raises(UnsafePathError):
        validate_manifest(_manifest_with(["a", "a/b"]))
    with pytest.raises(UnsafePathError):
        validate_manifest(_manifest_with(["x/y", "x/y"]))


def test_inconsistent_manifests_raise() -> None:
    good = _manifest_with(["a"])
    with pytest.raises(BlobError, match="does not match its file list"):
        validate_manifest(replace(good, blob_id="0" * 64))
    files = [FileEntry("a", 10, ["a" * 64])]  # 10 bytes at chunk size 4 need 3 chunks
    with pytest.raises(BlobError, match="needs 3 chunks"):
        validate_manifest(Manifest(compute_blob_id(files, 4), "m", 1, "t", 4, files, {}))
    files = [FileEntry("a", 1, ["XYZ"])]
    with pytest.raises(BlobError, match="malformed chunk hash"):
        validate_manifest(Manifest(compute_blob_id(files, 4), "m", 1, "t", 4, files, {}))


# ----------------------------------------------------------------- the store


def test_chunk_store_verifies_and_heals(tmp_path: Path) -> None:
    store = ChunkStore(tmp_path / "cache")
    data = b"hello chunk"
    digest = hashlib.sha256(data).hexdigest()
    with pytest.raises(ChunkHashMismatchError):
        store.put(digest, b"tampered")
    assert not store.has(digest)
    assert store.put(digest, data) is True and store.put(digest, data) is False
    assert store.path(digest) == tmp_path / "cache" / "chunks" / digest[:2] / digest
    assert store.get(digest) == data and store.missing([digest, "0" * 64, digest]) == ["0" * 64]
    store.path(digest).write_bytes(b"bit rot")
    with pytest.raises(ChunkHashMismatchError, match="corrupt on disk"):
        store.get(digest)
    assert not store.has(digest)  # the rotten copy is gone, so the next fetch asks for it
    with pytest.raises(BlobError, match="not a sha256"):
        store.path("../../etc/passwd")


# ------------------------------------------------------------- transfers


def _fetcher(
    broker: BrokerHandle, run: str, client: str, cache: Path, **kwargs: object
) -> tuple[MqttTransport, BlobFetcher]:
    transport = connect(broker, client)
    return transport, BlobFetcher(transport, ChunkStore(cache), run=run, client_id=client, **kwargs)  # type: ignore[arg-type]


def test_transfer_reuse_and_shared_chunks(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    files = {f"layers/{i}.bin": os.urandom(150_000) for i in range(4)} | {"config.json": b'{"layers": 4}'}
    v1 = _write_folder(tmp_path / "v1", files)
    m1 = build_manifest(v1, "pkg", 1, "t4", chunk_size=64 * 1024)
    changed = dict(files, **{"layers/2.bin": os.urandom(150_000)})  # one layer re-aligned
    v2 = _write_folder(tmp_path / "v2", changed)
    m2 = build_manifest(v2, "pkg", 2, "t4", chunk_size=64 * 1024)
    progress: list[FetchProgress] = []
    with serving(any_broker, run) as server:
        server.add(m1, v1)
        server.add(m2, v2)
        transport, fetcher = _fetcher(any_broker, run, client, tmp_path / "cache", window=3, progress=progress.append)
        try:
            dest = fetcher.fetch(m1, timeout=60)
            assert _tree(dest) == files and dest == tmp_path / "cache" / "blobs" / m1.blob_id
            assert (fetcher.stats.fetched, fetcher.stats.reused) == (13, 0)
            assert progress[-1].done_bytes == progress[-1].total_bytes == sum(map(len, files.values()))
            # Same blob again: nothing to fetch, not even the folder to rebuild.
            assert fetcher.fetch(m1) == dest and fetcher.stats.fetched == 0
            # Another destination: rebuilt from the cache alone.
            other = fetcher.fetch(m1, tmp_path / "elsewhere")
            assert _tree(other) == files and (fetcher.stats.fetched, fetcher.stats.reused) == (0, 13)
            # The re-aligned version costs only the changed layer's chunks.
            dest2 = fetcher.fetch(m2, timeout=60)
            assert _tree(dest2) == changed
            assert (fetcher.stats.fetched, fetcher.stats.reused) == (3, 10)
        finally:
            transport.close()


def test_corrupt_chunk_is_refetched_and_duplicate_ignored(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    files = {"a.bin": os.urandom(500_000), "b.bin": os.urandom(300_000)}
    src = _write_folder(tmp_path / "src", files)
    m = build_manifest(src, "pkg", 1, "t", chunk_size=100_000)
    bad, dup = m.files[0].chunks[1], m.files[1].chunks[0]
    with serving(any_broker, run, FaultyServer, corrupt={bad}, duplicate={dup}) as server:
        server.add(m, src)
        transport, fetcher = _fetcher(any_broker, run, client, tmp_path / "cache")
        try:
            dest = fetcher.fetch(m, timeout=60)
        finally:
            transport.close()
    assert _tree(dest) == files
    assert fetcher.stats.corrupt == 1 and fetcher.stats.requested.count(bad) == 2
    assert server.served[bad] == 2
    assert fetcher.stats.duplicates == 1 and fetcher.stats.fetched == 8


def test_server_keeps_serving_after_bad_requests(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = _write_folder(tmp_path / "src", {"x.bin": os.urandom(10_000)})
    m = build_manifest(src, "pkg", 1, "t", chunk_size=4096)
    with serving(any_broker, run) as server:
        server.add(m, src)
        transport, fetcher = _fetcher(any_broker, run, client, tmp_path / "cache")
        try:
            transport.publish(topics.chunkreq(run, client), b"\x93garbage")
            transport.publish(
                topics.chunkreq(run, client),
                codec.encode(
                    MessageType.CHUNK_REQUEST, ChunkRequest(m.blob_id, ["0" * 64]), run=run, round=-1, sender="impostor"
                ),
            )
            assert _tree(fetcher.fetch(m, timeout=60)) == {"x.bin": (src / "x.bin").read_bytes()}
            assert server.requests_rejected == 2
        finally:
            transport.close()


def test_refusals_end_the_fetch_quickly(
    any_broker: BrokerHandle, unique_id: Callable[[str], str], tmp_path: Path
) -> None:
    run, client = unique_id("run"), unique_id("edge")
    src = _write_folder(tmp_path / "src", {"x.bin": b"x" * 100})
    m = build_manifest(src, "pkg", 1, "t")
    with serving(any_broker, run) as server:
        transport, fetcher = _fetcher(any_broker, run, client, tmp_path / "cache")
        try:
            with pytest.raises(BlobError, match=r"refused blob.*unknown_blob"):
                fetcher.fetch(m, timeout=30)
            server.add(m, src)
            (src / "x.bin").write_bytes(b"y" * 101)  # the source changes after the manifest was added
            with pytest.raises(BlobError, match=r"refused blob.*unknown_chunk.*changed since its manifest"):
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

        transport, fetcher = _fetcher(broker, run, client, cache, progress=crash_at_30)
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

        transport, fetcher = _fetcher(broker, run, client, cache, progress=cut_at_60, request_timeout=10)
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
