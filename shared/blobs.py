"""Content-addressed, resumable transfer of folders (sub-LLM packages) over MQTT.

A folder is described by a :class:`~shared.protocol.Manifest`: every file is cut into
``chunk_size`` pieces named by their sha256, and the manifest's ``blob_id`` is the sha256
of the canonical file list. The coordinator's :class:`BlobServer` answers
:class:`~shared.protocol.ChunkRequest` messages by reading the pieces from the source
files lazily; a client's :class:`BlobFetcher` asks for what its on-disk
:class:`ChunkStore` lacks, a bounded window at a time, verifies each chunk, retries
missing or corrupt ones, and finally materializes the folder atomically. Because the store
keeps every verified chunk, a broken transfer or a restart costs only the chunks not yet
stored, and a re-aligned package that shares most files with the cached one costs only
its new chunks.

Nothing a manifest names can escape the destination: absolute paths, ``..``, backslashes,
symlinked directories and a blob id (a client's folder name) that is not a sha256 raise
:class:`~shared.errors.UnsafePathError`. Every received chunk is hashed before anything else
looks at it (:func:`check_chunk`): one that does not match its name is refused and never stored.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from shared import codec, topics
from shared.errors import (
    BlobError,
    ChunkHashMismatchError,
    ProtocolError,
    UnsafePathError,
)
from shared.protocol import (
    COORDINATOR_ID,
    Chunk,
    ChunkRequest,
    Envelope,
    FileEntry,
    Manifest,
    MessageType,
    Nack,
)
from shared.transport import ConnectionEvent, InboundMessage, Transport
from shared.typed import check_plain

log = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""4 MiB: big enough that per-message overhead vanishes, small enough for any broker limit we set."""

MARKER_NAME = ".fedsoda_blob"
"""File a materialized folder carries with its blob_id (never part of a manifest)."""

_HASH_RE = re.compile(r"[0-9a-f]{64}")
_READ_SIZE = 1024 * 1024


def compute_blob_id(files: list[FileEntry], chunk_size: int) -> str:
    """sha256 over the canonical file list: equal content gives an equal id, whatever the name.

    Args:
        files: File entries (any order; they are sorted by path).
        chunk_size: The manifest's chunk size (part of the identity: it shapes the hashes).

    Returns:
        64 lowercase hex digits.
    """
    canonical = {
        "chunk_size": chunk_size,
        "files": [[f.path, f.size, list(f.chunks)] for f in sorted(files, key=lambda f: f.path)],
    }
    text = json.dumps(canonical, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def check_relative_path(path: str) -> PurePosixPath:
    """Validate a manifest path: relative, posix, no ``..``, nothing odd.

    Args:
        path: Path as written in a :class:`FileEntry`.

    Returns:
        The path as a PurePosixPath.

    Raises:
        UnsafePathError: Absolute, empty, ``.``/``..`` components, backslashes, NUL bytes,
            or a Windows drive prefix.
    """
    if not isinstance(path, str) or not path or len(path) > 4096:
        raise UnsafePathError(f"manifest path {path!r} is empty or too long")
    if "\x00" in path or "\\" in path or path.startswith("/") or re.match(r"^[A-Za-z]:", path):
        raise UnsafePathError(f"manifest path {path!r} is absolute or not a plain posix path")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafePathError(f"manifest path {path!r} has an empty, '.' or '..' component")
    if parts[-1] == MARKER_NAME:
        raise UnsafePathError(f"manifest path {path!r} uses the reserved name {MARKER_NAME}")
    return PurePosixPath(path)


def _hash_file_chunks(path: Path, chunk_size: int) -> list[str]:
    hashes = []
    with path.open("rb") as fh:
        while True:
            piece = fh.read(chunk_size)
            if not piece:
                break
            hashes.append(hashlib.sha256(piece).hexdigest())
    return hashes


def _iter_files(folder: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, absolute path) of every regular file, sorted; refuses symlinked dirs."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for d in dirnames:
            if (base / d).is_symlink():
                raise UnsafePathError(f"{base / d} is a symlinked directory; copy its content into the folder")
        for name in filenames:
            full = base / name
            rel = full.relative_to(folder).as_posix()
            if name == MARKER_NAME and base == folder:
                continue
            if not full.is_file():
                raise UnsafePathError(f"{full} is not a regular file (dangling link or special file)")
            found.append((rel, full))
    yield from sorted(found)


def build_manifest(
    folder: str | os.PathLike[str],
    name: str,
    version: int,
    tier: str,
    meta: dict[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Manifest:
    """Hash a folder into a manifest.

    Args:
        folder: The folder to describe (symlinked files are read through; symlinked
            directories are refused).
        name: Human name of the blob.
        version: Package version.
        tier: Tier the package serves.
        meta: Plain-typed metadata (layer map ...).
        chunk_size: Bytes per chunk.

    Returns:
        The manifest, files sorted by path.

    Raises:
        BlobError: ``folder`` is not a directory, or ``meta`` is not plain data.
        UnsafePathError: A symlinked directory or a special file inside ``folder``.
    """
    root = Path(folder)
    if not root.is_dir():
        raise BlobError(f"cannot build a manifest: {root} is not a directory")
    if chunk_size <= 0:
        raise BlobError(f"chunk_size must be positive, got {chunk_size}")
    meta = dict(meta or {})
    problems: list = []
    check_plain(meta, "meta", problems)
    if problems:
        raise BlobError(f"manifest meta must be plain data: {problems[0]}")
    files = [
        FileEntry(path=rel, size=full.stat().st_size, chunks=_hash_file_chunks(full, chunk_size))
        for rel, full in _iter_files(root)
    ]
    return Manifest(
        blob_id=compute_blob_id(files, chunk_size),
        name=name,
        version=int(version),
        tier=tier,
        chunk_size=chunk_size,
        files=files,
        meta=meta,
    )


def validate_manifest(manifest: Manifest) -> None:
    """Check a received manifest before acting on it.

    Args:
        manifest: The manifest.

    Raises:
        UnsafePathError: A path could escape the destination, two entries collide, or the
            blob_id (a client names its package folder after it) is not a sha256 hex digest.
        BlobError: Bad chunk size, chunk counts that do not fit file sizes, malformed
            hashes, or a blob_id that does not match the file list.
    """
    if not _HASH_RE.fullmatch(manifest.blob_id):
        raise UnsafePathError(f"manifest blob_id {manifest.blob_id[:80]!r} is not a sha256 hex digest")
    if manifest.chunk_size <= 0:
        raise BlobError(f"manifest {manifest.blob_id[:12]} has chunk_size {manifest.chunk_size}")
    seen: set[str] = set()
    prefixes: set[str] = set()
    for entry in manifest.files:
        rel = check_relative_path(entry.path)
        if entry.path in seen or entry.path in prefixes:
            raise UnsafePathError(f"manifest path {entry.path!r} appears twice or is also a directory")
        seen.add(entry.path)
        prefixes.update(str(p) for p in rel.parents if str(p) != ".")
        if entry.size < 0:
            raise BlobError(f"manifest file {entry.path!r} has negative size {entry.size}")
        expected = -(-entry.size // manifest.chunk_size)
        if len(entry.chunks) != expected:
            raise BlobError(
                f"manifest file {entry.path!r} of {entry.size} bytes needs {expected} chunks, lists {len(entry.chunks)}"
            )
        bad = [h for h in entry.chunks if not _HASH_RE.fullmatch(h)]
        if bad:
            raise BlobError(f"manifest file {entry.path!r} has a malformed chunk hash {bad[0]!r}")
    if seen & prefixes:
        raise UnsafePathError(f"manifest path {sorted(seen & prefixes)[0]!r} is both a file and a directory")
    actual = compute_blob_id(manifest.files, manifest.chunk_size)
    if actual != manifest.blob_id:
        raise BlobError(f"manifest blob_id {manifest.blob_id[:12]} does not match its file list ({actual[:12]})")


def chunk_lengths(manifest: Manifest) -> dict[str, int]:
    """Expected byte length of every distinct chunk of a manifest.

    Args:
        manifest: A validated manifest.

    Returns:
        hash -> length, in first-appearance order.
    """
    lengths: dict[str, int] = {}
    for entry in manifest.files:
        for i, h in enumerate(entry.chunks):
            lengths.setdefault(h, min(manifest.chunk_size, entry.size - i * manifest.chunk_size))
    return lengths


def manifest_size(manifest: Manifest) -> int:
    """Total bytes of the files a manifest lists."""
    return sum(f.size for f in manifest.files)


def check_chunk(envelope: Envelope) -> None:
    """Check that a received chunk's bytes hash to the name it carries.

    Done before anything else looks at a chunk, so corrupt or forged data is refused (and
    logged) whether or not a download is waiting for it.

    Args:
        envelope: A decoded ``chunk`` envelope.

    Raises:
        BlobError: The hash is not a sha256 hex digest.
        ChunkHashMismatchError: The data hashes to something else.
    """
    chunk: Chunk = envelope.body
    if not _HASH_RE.fullmatch(chunk.hash):
        raise BlobError(f"chunk hash {chunk.hash[:80]!r} is not a sha256 hex digest")
    actual = hashlib.sha256(chunk.data).hexdigest()
    if actual != chunk.hash:
        raise ChunkHashMismatchError(
            f"chunk {chunk.hash[:12]} ({len(chunk.data)} bytes) hashes to {actual[:12]}: corrupt or forged, not used"
        )


class ChunkStore:
    """Verified chunks on disk, one file per chunk: ``root/chunks/ab/abcdef...``.

    Writes are atomic (temp file + rename), so a crash never leaves a partial chunk under
    its final name. Safe to share between processes.

    Args:
        root: Cache folder (created if missing).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.chunk_dir = self.root / "chunks"
        self.chunk_dir.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        """Where a chunk lives (whether or not it is stored).

        Args:
            digest: sha256 hex.

        Returns:
            Its path.

        Raises:
            BlobError: ``digest`` is not 64 lowercase hex digits.
        """
        if not _HASH_RE.fullmatch(digest):
            raise BlobError(f"{digest!r} is not a sha256 hex digest")
        return self.chunk_dir / digest[:2] / digest

    def has(self, digest: str) -> bool:
        """Whether a chunk is stored."""
        return self.path(digest).is_file()

    def missing(self, digests: list[str]) -> list[str]:
        """The digests not stored, in order, without repeats."""
        return [d for d in dict.fromkeys(digests) if not self.has(d)]

    def put(self, digest: str, data: bytes) -> bool:
        """Verify and store a chunk.

        Args:
            digest: Its sha256 hex.
            data: Its bytes.

        Returns:
            True if newly stored, False if it was already there.

        Raises:
            ChunkHashMismatchError: ``data`` does not hash to ``digest``.
        """
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise ChunkHashMismatchError(f"chunk {digest[:12]} hashes to {actual[:12]}: corrupt in transit")
        target = self.path(digest)
        if target.is_file():
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{digest}.{uuid.uuid4().hex}.tmp")
        with tmp.open("wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
        return True

    def get(self, digest: str, *, verify: bool = True) -> bytes:
        """Read a stored chunk.

        Args:
            digest: Its sha256 hex.
            verify: Re-hash it; a corrupt file is deleted before raising.

        Returns:
            The bytes.

        Raises:
            BlobError: Not stored.
            ChunkHashMismatchError: The stored bytes no longer match (disk corruption).
        """
        target = self.path(digest)
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            raise BlobError(f"chunk {digest[:12]} is not in the cache {self.chunk_dir}") from None
        if verify and hashlib.sha256(data).hexdigest() != digest:
            self.discard(digest)
            raise ChunkHashMismatchError(f"cached chunk {digest[:12]} is corrupt on disk; deleted it")
        return data

    def discard(self, digest: str) -> None:
        """Delete a chunk if stored."""
        self.path(digest).unlink(missing_ok=True)


def resolve_inside(root: Path, rel: str) -> Path:
    """``root / rel``, refusing anything that resolves outside ``root`` (symlinks included).

    Args:
        root: The folder a package is being built in.
        rel: A manifest path.

    Returns:
        The path to write.

    Raises:
        UnsafePathError: ``rel`` is not a safe relative path, or resolves outside ``root``
            (through ``..`` or a symlinked folder).
    """
    check_relative_path(rel)
    target = root / rel
    resolved_root = root.resolve()
    if not target.resolve().is_relative_to(resolved_root):
        raise UnsafePathError(f"manifest path {rel!r} resolves outside {root}")
    return target


def materialize(
    manifest: Manifest, store: ChunkStore, dest: str | os.PathLike[str], *, verify: set[str] | None = None
) -> Path:
    """Assemble a manifest's folder from stored chunks and move it into place atomically.

    The folder is built beside ``dest`` and renamed over it, so readers see either the old
    folder or the complete new one, never a half-written mix.

    Args:
        manifest: A validated manifest whose chunks are all stored.
        store: The chunk store.
        dest: Destination folder (replaced if it exists).
        verify: Digests to re-hash while reading (chunks not verified in this session);
            None re-hashes all.

    Returns:
        ``dest`` as a Path.

    Raises:
        ChunkHashMismatchError: A stored chunk is corrupt (it is deleted; fetch again).
        UnsafePathError: A path escapes the destination.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        for entry in manifest.files:
            target = resolve_inside(tmp, entry.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as fh:
                for digest in entry.chunks:
                    if verify is None or digest in verify:
                        fh.write(store.get(digest))
                    else:
                        _append_file(fh, store.path(digest))
            if target.stat().st_size != entry.size:
                raise BlobError(f"{entry.path} came out {target.stat().st_size} bytes, manifest says {entry.size}")
        (tmp / MARKER_NAME).write_text(manifest.blob_id)
        old = None
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:12]}"
            os.replace(dest, old)
        os.replace(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _append_file(out: BinaryIO, source: Path) -> None:
    """Append a whole file to ``out``, letting the kernel copy where it can (no Python buffers)."""
    out.flush()
    with source.open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        sent = 0
        if hasattr(os, "sendfile"):
            with contextlib.suppress(OSError):  # e.g. a filesystem without sendfile: copy below
                while sent < size and (n := os.sendfile(out.fileno(), src.fileno(), sent, size - sent)):
                    sent += n
        src.seek(sent)
        shutil.copyfileobj(src, out)


def is_materialized(manifest: Manifest, dest: str | os.PathLike[str]) -> bool:
    """Whether ``dest`` already holds this manifest's folder (marker and file sizes match)."""
    dest = Path(dest)
    marker = dest / MARKER_NAME
    if not marker.is_file() or marker.read_text().strip() != manifest.blob_id:
        return False
    return all((dest / f.path).is_file() and (dest / f.path).stat().st_size == f.size for f in manifest.files)


@dataclass
class _Source:
    path: Path
    offset: int
    length: int
    stamp: tuple[int, int]  # (size, mtime_ns) when the manifest was added


class BlobServer:
    """Coordinator side: answers chunk requests for the manifests it holds.

    Chunks are read from the source files only when requested (memory stays at one chunk
    per request being served) and published to the requester's ``chunk`` topic. A source
    file whose size or mtime changed since :meth:`add` is refused rather than re-hashed on
    every read (sha256 runs at ~250 MB/s on small CPUs; the receiver verifies every chunk
    anyway). Requests are capped at
    ``max_hashes_per_request`` chunks; the client's window keeps below that.

    Args:
        transport: Connected transport used to publish chunks and nacks.
        run: Run id.
        sender: Envelope sender (the coordinator's id).
        max_hashes_per_request: Chunks served per request at most (bounds queued memory).
        refused: Counts each refusal by its nack code (the owner's refusal counters).
    """

    def __init__(
        self,
        transport: Transport,
        *,
        run: str,
        sender: str = COORDINATOR_ID,
        max_hashes_per_request: int = 32,
        refused: Counter[str] | None = None,
    ) -> None:
        self.transport = transport
        self.run = topics.check_id(run, "run id")
        self.sender = sender
        self.max_hashes_per_request = max_hashes_per_request
        self.manifests: dict[str, Manifest] = {}
        self._folders: dict[str, Path] = {}
        self._index: dict[str, _Source] = {}
        self.chunks_served = 0
        self.bytes_served = 0
        self.requests_rejected = 0
        self.refused: Counter[str] = Counter() if refused is None else refused

    def add(self, manifest: Manifest, folder: str | os.PathLike[str]) -> None:
        """Serve a manifest's chunks from ``folder``.

        Args:
            manifest: Manifest built from ``folder``.
            folder: Its source folder.

        Raises:
            BlobError: A listed file is missing or has another size than the manifest says.
        """
        validate_manifest(manifest)
        root = Path(folder)
        for entry in manifest.files:
            path = root / check_relative_path(entry.path)
            if not path.is_file() or path.stat().st_size != entry.size:
                raise BlobError(
                    f"cannot serve {manifest.blob_id[:12]}: {path} is missing or changed since the manifest"
                )
        self.manifests[manifest.blob_id] = manifest
        self._folders[manifest.blob_id] = root
        self._reindex()

    def remove(self, blob_id: str) -> None:
        """Stop serving a manifest (its chunks stay served if another manifest has them)."""
        self.manifests.pop(blob_id, None)
        self._folders.pop(blob_id, None)
        self._reindex()

    def _reindex(self) -> None:
        index: dict[str, _Source] = {}
        for blob_id, manifest in self.manifests.items():
            root = self._folders[blob_id]
            for entry in manifest.files:
                path = root / entry.path
                stamp = _stamp(path)
                for i, digest in enumerate(entry.chunks):
                    offset = i * manifest.chunk_size
                    index.setdefault(
                        digest, _Source(path, offset, min(manifest.chunk_size, entry.size - offset), stamp)
                    )
        self._index = index

    def read_chunk(self, digest: str) -> bytes:
        """Read one chunk from its source file and check it.

        Args:
            digest: sha256 hex of a chunk of a served manifest.

        Returns:
            The chunk's bytes.

        Raises:
            BlobError: Unknown digest, or the source file changed since :meth:`add`.
        """
        source = self._index.get(digest)
        if source is None:
            raise BlobError(f"chunk {digest[:12]} is not part of any served manifest")
        if _stamp(source.path) != source.stamp:
            raise BlobError(f"source {source.path} changed since its manifest was added; rebuild and re-add it")
        with source.path.open("rb") as fh:
            fh.seek(source.offset)
            data = fh.read(source.length)
        if len(data) != source.length:
            raise BlobError(f"source {source.path} is shorter than its manifest says")
        return data

    def serve(self, client_id: str, request: ChunkRequest, *, ref_message_id: str = "", round: int = -1) -> int:
        """Publish the requested chunks to ``client_id``; nack what cannot be served.

        Args:
            client_id: Requesting client.
            request: Its request.
            ref_message_id: The request's message id (quoted in a nack).
            round: Round for the envelopes.

        Returns:
            Number of chunks published.
        """
        if request.blob_id not in self.manifests:
            self._nack(
                client_id,
                ref_message_id,
                round,
                "unknown_blob",
                f"blob {request.blob_id[:12]} is not served (stale manifest?)",
            )
            return 0
        hashes = list(dict.fromkeys(request.hashes))
        if len(hashes) > self.max_hashes_per_request:
            log.warning(
                "client %s asked for %d chunks at once; serving the first %d",
                client_id,
                len(hashes),
                self.max_hashes_per_request,
            )
            hashes = hashes[: self.max_hashes_per_request]
        served = 0
        topic = topics.chunk(self.run, client_id)
        for digest in hashes:
            try:
                data = self.read_chunk(digest)
            except BlobError as exc:
                self._nack(client_id, ref_message_id, round, "unknown_chunk", str(exc))
                continue
            payload = codec.encode(
                MessageType.CHUNK,
                Chunk(blob_id=request.blob_id, hash=digest, data=data),
                run=self.run,
                round=round,
                sender=self.sender,
            )
            self.transport.publish(topic, payload, qos=1)
            served += 1
            self.bytes_served += len(data)
        self.chunks_served += served
        return served

    def handle(self, message: InboundMessage) -> int:
        """Decode a message from a ``chunkreq`` topic and serve it; bad input is logged and nacked.

        Args:
            message: A message received on ``topics.all_of(run, TopicKind.CHUNKREQ)``.

        Returns:
            Number of chunks published (0 for a refused request).
        """
        try:
            info, envelope = codec.decode_message(message.topic, message.payload, run=self.run)
        except ProtocolError as exc:
            self.requests_rejected += 1
            log.warning("refused chunk request on %s: %s", message.topic, exc)
            client = topics.client_of(message.topic)
            if client is not None:
                self._nack(client, "", -1, "bad_message", str(exc))
            return 0
        assert info.client is not None  # chunkreq topics are per-client
        return self.serve(info.client, envelope.body, ref_message_id=envelope.message_id, round=envelope.round)

    def _nack(self, client_id: str, ref: str, round: int, code: str, reason: str) -> None:
        self.refused[code] += 1
        log.warning("refused chunk request on %s: [%s] %s", topics.chunkreq(self.run, client_id), code, reason)
        body = Nack(client_id=client_id, round=round, ref_message_id=ref, code=code, reason=reason)
        payload = codec.encode(MessageType.NACK, body, run=self.run, round=round, sender=self.sender)
        self.transport.publish(topics.nack(self.run, client_id), payload, qos=1)


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, or (-1, -1) if it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)



@dataclass(frozen=True)
class FetchProgress:
    """Progress of one fetch, handed to the progress callback after every stored chunk.

    Attributes:
        blob_id: The manifest being fetched.
        total_chunks: Distinct chunks the folder needs.
        done_chunks: Distinct chunks present (reused + fetched).
        total_bytes: Bytes of all distinct chunks.
        done_bytes: Bytes of the present ones.
        fetched: Chunks received in this fetch.
        reused: Chunks found in the cache.
    """

    blob_id: str
    total_chunks: int
    done_chunks: int
    total_bytes: int
    done_bytes: int
    fetched: int
    reused: int


@dataclass
class FetchStats:
    """Counters of one :meth:`BlobFetcher.fetch`.

    Attributes:
        total_chunks: Distinct chunks the manifest needs.
        reused: Found in the cache (not requested).
        fetched: Received, verified and stored now.
        bytes_fetched: Bytes of the fetched chunks.
        duplicates: Deliveries of a chunk already stored (QoS 1 repeats), ignored.
        corrupt: Deliveries whose sha256 did not match (re-requested).
        rejected: Messages on the chunk topic that failed decoding.
        re_requests: Chunks asked for again (timeout, reconnect, corruption).
        requested: Every digest asked for, in order (for tests and diagnostics).
    """

    total_chunks: int = 0
    reused: int = 0
    fetched: int = 0
    bytes_fetched: int = 0
    duplicates: int = 0
    corrupt: int = 0
    rejected: int = 0
    re_requests: int = 0
    requested: list[str] = field(default_factory=list)


class BlobFetcher:
    """Client side: fetch a manifest's missing chunks and materialize its folder.

    ``fetch`` drives the transport itself (``transport.poll``), so while it runs every other
    message still reaches its handlers. Each fetch keeps at most ``window`` chunks in
    flight; when no chunk arrives for ``request_timeout`` seconds, or the connection comes
    back, the in-flight ones are asked for again, up to ``max_attempts`` times each.

    Args:
        transport: Connected transport (persistent session recommended).
        store: On-disk chunk cache.
        run: Run id.
        client_id: This client's id (its chunk topics).
        window: Chunks in flight at most.
        request_timeout: Seconds without progress before re-requesting.
        max_attempts: Requests per chunk before giving up.
        progress: Called with a :class:`FetchProgress` after each stored chunk.
        refused: Counts each refused chunk message by reason (the owner's refusal counters).
    """

    def __init__(
        self,
        transport: Transport,
        store: ChunkStore,
        *,
        run: str,
        client_id: str,
        window: int = 8,
        request_timeout: float = 20.0,
        max_attempts: int = 6,
        progress: Callable[[FetchProgress], None] | None = None,
        refused: Counter[str] | None = None,
    ) -> None:
        if window < 1:
            raise BlobError(f"window must be at least 1, got {window}")
        self.transport = transport
        self.store = store
        self.run = topics.check_id(run, "run id")
        self.client_id = topics.check_id(client_id, "client id")
        self.window = window
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.progress = progress
        self.refused: Counter[str] = Counter() if refused is None else refused
        self.stats = FetchStats()
        self._lengths: dict[str, int] = {}
        self._pending: dict[str, None] = {}  # an ordered set: requested in manifest order
        self._inflight: dict[str, int] = {}
        self._done: set[str] = set()
        self._fresh: set[str] = set()
        self._blob_id = ""
        self._refusal: str | None = None
        self._last_activity = 0.0
        self._total_bytes = 0
        self._done_bytes = 0

    def fetch(
        self, manifest: Manifest, dest: str | os.PathLike[str] | None = None, *, timeout: float | None = None
    ) -> Path:
        """Make ``dest`` hold the manifest's folder, fetching only chunks the cache lacks.

        Args:
            manifest: The manifest (validated here).
            dest: Destination folder; default ``<store root>/blobs/<blob_id>``.
            timeout: Overall seconds allowed; None waits as long as chunks keep coming.

        Returns:
            The destination folder.

        Raises:
            UnsafePathError: The manifest names a path outside the destination.
            BlobError: The manifest is inconsistent, a chunk failed ``max_attempts`` times,
                the coordinator refused the blob, or ``timeout`` passed.
        """
        validate_manifest(manifest)
        dest = Path(dest) if dest is not None else self.store.root / "blobs" / manifest.blob_id
        self.stats = FetchStats()
        self._lengths = chunk_lengths(manifest)
        self.stats.total_chunks = len(self._lengths)
        if is_materialized(manifest, dest):
            self.stats.reused = self.stats.total_chunks
            return dest
        deadline = None if timeout is None else time.monotonic() + timeout
        self._blob_id = manifest.blob_id
        self._total_bytes = sum(self._lengths.values())
        self._fresh = set()
        chunk_topic = topics.chunk(self.run, self.client_id)
        nack_topic = topics.nack(self.run, self.client_id)
        self._refusal = None
        self.transport.subscribe(chunk_topic, self._on_chunk_message)
        self.transport.subscribe(nack_topic, self._on_nack_message)
        try:
            for _attempt in range(2):
                self._transfer(deadline)
                try:
                    return materialize(manifest, self.store, dest, verify=set(self._lengths) - self._fresh)
                except ChunkHashMismatchError as exc:
                    # A cached chunk rotted on disk (it was deleted): fetch the gaps once more.
                    log.warning("%s; fetching missing chunks again", exc)
            raise BlobError(f"blob {manifest.blob_id[:12]}: cached chunks keep failing verification")
        finally:
            self.transport.remove_handler(chunk_topic, self._on_chunk_message)
            self.transport.remove_handler(nack_topic, self._on_nack_message)

    def _transfer(self, deadline: float | None) -> None:
        missing = self.store.missing(list(self._lengths))
        self._done = set(self._lengths) - set(missing)
        self.stats.reused = len(self._done - self._fresh)
        self._done_bytes = sum(self._lengths[d] for d in self._done)
        self._pending = dict.fromkeys(missing)
        self._inflight = {}
        self._report()
        self._last_activity = time.monotonic()
        link_lost = False
        while self._pending or self._inflight:
            self._top_up()
            event = self.transport.poll(0.2)
            if isinstance(event, ConnectionEvent):
                if not event.connected:
                    link_lost = True
                elif link_lost:
                    # Chunks in flight when the link dropped may be gone: ask again right away.
                    link_lost = False
                    self._re_request(list(self._inflight), "reconnected")
            if self._refusal:
                raise BlobError(f"coordinator refused blob {self._blob_id[:12]}: {self._refusal}")
            now = time.monotonic()
            if now - self._last_activity > self.request_timeout and self._inflight:
                self._re_request(list(self._inflight), f"no chunk for {self.request_timeout:.0f} s")
            if deadline is not None and now > deadline:
                raise BlobError(
                    f"blob {self._blob_id[:12]}: timed out with {len(self._pending) + len(self._inflight)} "
                    f"of {self.stats.total_chunks} chunks missing; the coordinator or broker may be down"
                )

    def _top_up(self) -> None:
        free = self.window - len(self._inflight)
        if free <= 0 or not self._pending:
            return
        batch = list(itertools.islice(self._pending, free))
        for digest in batch:
            del self._pending[digest]
            self._inflight[digest] = 1
        self._request(batch)

    def _request(self, digests: list[str]) -> None:
        self.stats.requested.extend(digests)
        payload = codec.encode(
            MessageType.CHUNK_REQUEST,
            ChunkRequest(blob_id=self._blob_id, hashes=digests),
            run=self.run,
            round=-1,
            sender=self.client_id,
        )
        self.transport.publish(topics.chunkreq(self.run, self.client_id), payload, qos=1)
        self._last_activity = time.monotonic()

    def _re_request(self, digests: list[str], why: str) -> None:
        if not digests:
            return
        for digest in digests:
            self._inflight[digest] += 1
            if self._inflight[digest] > self.max_attempts:
                raise BlobError(
                    f"chunk {digest[:12]} of blob {self._blob_id[:12]} still missing after {self.max_attempts} requests"
                )
        log.info("re-requesting %d chunks (%s)", len(digests), why)
        self.stats.re_requests += len(digests)
        self._request(digests)

    def _on_chunk_message(self, message: InboundMessage) -> None:
        try:
            _info, envelope = codec.decode_message(message.topic, message.payload, run=self.run)
            check_chunk(envelope)
        except (ProtocolError, BlobError) as exc:
            self.refused[type(exc).__name__] += 1
            log.warning("refused chunk on %s: [%s] %s", message.topic, type(exc).__name__, exc)
            if not isinstance(exc, ChunkHashMismatchError):
                self.stats.rejected += 1
            elif envelope.body.hash in self._lengths and envelope.body.hash not in self._done:
                self._corrupt(envelope.body.hash)  # a chunk we need: asked for again, never stored
            return
        body: Chunk = envelope.body
        digest = body.hash
        if digest in self._done:
            self.stats.duplicates += 1
            return
        if digest not in self._lengths:
            log.debug("ignoring chunk %s that this blob does not need", digest[:12])
            return
        # A needed chunk we did not ask for in this fetch (an answer to a request from before a
        # restart, kept by the persistent session) is as good as a requested one: its bytes
        # hash to its name (checked above).
        self.store.put(digest, body.data)
        self._inflight.pop(digest, None)
        self._pending.pop(digest, None)
        self._done.add(digest)
        self._fresh.add(digest)
        self._done_bytes += len(body.data)
        self.stats.fetched += 1
        self.stats.bytes_fetched += len(body.data)
        self._last_activity = time.monotonic()
        self._report()

    def _corrupt(self, digest: str) -> None:
        """Count a corrupt delivery of a needed chunk and ask for it again (never store it)."""
        self.stats.corrupt += 1
        if digest in self._inflight:  # else it is still pending and gets requested in turn
            self._re_request([digest], "corrupt")

    def _on_nack_message(self, message: InboundMessage) -> None:
        try:
            _info, envelope = codec.decode_message(message.topic, message.payload, run=self.run)
        except ProtocolError as exc:
            log.warning("dropped a bad nack: %s", exc)
            return
        nack: Nack = envelope.body
        if nack.code in ("unknown_blob", "unknown_chunk"):
            self._refusal = f"{nack.code}: {nack.reason}"

    def _report(self) -> None:
        if self.progress is None:
            return
        self.progress(
            FetchProgress(
                blob_id=self._blob_id,
                total_chunks=self.stats.total_chunks,
                done_chunks=len(self._done),
                total_bytes=self._total_bytes,
                done_bytes=self._done_bytes,
                fetched=self.stats.fetched,
                reused=self.stats.reused,
            )
        )
