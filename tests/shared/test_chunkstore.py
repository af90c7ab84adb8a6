"""The on-disk chunk store: verified writes, and healing from a corrupt chunk."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.chunkstore import ChunkStore
from shared.errors import BlobError, ChunkHashMismatchError


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
