"""The on-disk chunk store and the folders built from it.

A client keeps every verified chunk in a :class:`ChunkStore`, so a broken transfer or a
restart costs only the chunks not yet stored, and a package that shares files with a cached
one costs only its new chunks. :func:`materialize` assembles a manifest's folder from the
store beside its destination and renames it into place, so readers never see a half-written
folder; every path is resolved inside the destination (:func:`resolve_inside`), symlinks
included.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

from shared.errors import BlobError, ChunkHashMismatchError, UnsafePathError
from shared.manifests import MARKER_NAME, check_relative_path, is_sha256_hex
from shared.protocol import Manifest


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
        if not is_sha256_hex(digest):
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
