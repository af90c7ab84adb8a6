"""Manifests: hashing a folder, and refusing unsafe or inconsistent manifests."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace
from pathlib import Path

import pytest

from shared.errors import BlobError, UnsafePathError
from shared.manifests import MARKER_NAME, build_manifest, compute_blob_id, validate_manifest
from shared.protocol import FileEntry, Manifest
from tests.shared.helpers import write_folder


def test_manifest_lists_files_and_chunks(tmp_path: Path) -> None:
    files = {
        "config.json": b"{}",
        "empty.bin": b"",
        "layers/l0.safetensors": os.urandom(3 * 1000),  # exactly 3 chunks
        "layers/l1.safetensors": os.urandom(2500),
    }
    folder = write_folder(tmp_path / "pkg", files)
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
    folder = write_folder(tmp_path / "pkg", {"a.txt": b"a"})
    outside = write_folder(tmp_path / "outside", {"secret": b"s"})
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
