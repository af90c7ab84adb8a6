"""The coordinator's side of a blob transfer: answering chunk requests.

A :class:`BlobServer` holds the manifests the coordinator offers and answers each
:class:`~shared.protocol.ChunkRequest` by reading the requested pieces from the source files
lazily and publishing them to the requester's ``chunk`` topic; what it cannot serve (an
unknown blob or chunk, a source file changed since its manifest) it nacks.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from shared import codec, topics
from shared.errors import BlobError
from shared.manifests import check_relative_path, validate_manifest
from shared.protocol import COORDINATOR_ID, Chunk, ChunkRequest, Manifest, MessageType, Nack
from shared.transport_types import Transport

log = logging.getLogger(__name__)


@dataclass
class _Source:
    path: Path
    offset: int
    length: int
    stamp: tuple[int, int]  # (size, mtime_ns) when the manifest was added


class BlobServer:
    """Coordinator side: answers chunk requests for the manifests it holds.

    The owner decodes each message from a ``chunkreq`` topic and hands the request to
    :meth:`serve`, its one entry point. Chunks are read from the source files only when
    requested (memory stays at one chunk per request being served) and published to the
    requester's ``chunk`` topic. A source file whose size or mtime changed since :meth:`add`
    is refused rather than re-hashed on every read (sha256 runs at ~250 MB/s on small CPUs;
    the receiver verifies every chunk anyway). Requests are capped at
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
