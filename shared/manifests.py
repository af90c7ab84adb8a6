"""Manifests: what a folder (a sub-LLM package) is, chunk by chunk, and how to check one.

A folder is described by a :class:`~shared.protocol.Manifest`: every file is cut into
``chunk_size`` pieces named by their sha256, and the manifest's ``blob_id`` is the sha256
of the canonical file list, so equal content gives an equal id and a re-aligned package
that shares most files with a cached one shares their chunks.

Nothing a manifest names can escape the destination: absolute paths, ``..``, backslashes
and a blob id (a client's folder name) that is not a sha256 raise
:class:`~shared.errors.UnsafePathError` (:func:`validate_manifest`), and
:func:`build_manifest` refuses symlinked directories. Every received chunk is hashed before
anything else looks at it (:func:`check_chunk`): one that does not match its name is
refused and never stored.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from shared.errors import BlobError, ChunkHashMismatchError, UnsafePathError
from shared.protocol import Chunk, Envelope, FileEntry, Manifest
from shared.typed import check_plain

DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
"""4 MiB: big enough that per-message overhead vanishes, small enough for any broker limit we set."""

MARKER_NAME = ".fedsoda_blob"
"""File a materialized folder carries with its blob_id (never part of a manifest)."""

_HASH_RE = re.compile(r"[0-9a-f]{64}")


def is_sha256_hex(text: str) -> bool:
    """Whether ``text`` is a sha256 digest as manifests write it: 64 lowercase hex digits."""
    return _HASH_RE.fullmatch(text) is not None


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
    if not is_sha256_hex(manifest.blob_id):
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
        bad = [h for h in entry.chunks if not is_sha256_hex(h)]
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
    if not is_sha256_hex(chunk.hash):
        raise BlobError(f"chunk hash {chunk.hash[:80]!r} is not a sha256 hex digest")
    actual = hashlib.sha256(chunk.data).hexdigest()
    if actual != chunk.hash:
        raise ChunkHashMismatchError(
            f"chunk {chunk.hash[:12]} ({len(chunk.data)} bytes) hashes to {actual[:12]}: corrupt or forged, not used"
        )
