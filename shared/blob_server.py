"""The coordinator's side of a blob transfer: answering chunk requests.

A :class:`BlobServer` holds the manifests the coordinator offers and answers each
:class:`~shared.protocol.ChunkRequest` by reading the requested pieces from the source files
lazily and publishing them to the requester's ``chunk`` topic; what it cannot serve (an
unknown blob or chunk, a source file changed since its manifest) it nacks. Chunks and nacks
are signed with the coordinator's key, like everything else the coordinator publishes.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared import codec, topics
from shared.errors import BlobError
from shared.manifests import check_relative_path, validate_manifest
from shared.protocol import (
    COORDINATOR_ID,
    Chunk,
    ChunkRequest,
    Manifest,
    MessageType,
    Nack,
)
from shared.rate import TokenBucket
from shared.signing import SigningKey
from shared.transport_types import Transport

log = logging.getLogger(__name__)

UNKNOWN_BLOB = "unknown_blob"
"""Nack code: the requested blob is not served (a stale manifest, a coordinator that restarted)."""
UNKNOWN_CHUNK = "unknown_chunk"
"""Nack code: a requested chunk is not part of the blob, or its source file changed."""
RATE_LIMITED = "rate_limited"
"""Nack code: the client asked for chunks faster than ``requests_per_second`` allows."""
BUDGET_EXCEEDED = "budget_exceeded"
"""Nack code: the client was already sent ``budget_factor`` x the bytes of this package."""
NOT_ENTITLED = "not_entitled"
"""Nack code: the package is another tier's than the one the client was assigned."""
DOWNLOAD_REFUSALS = frozenset({UNKNOWN_BLOB, UNKNOWN_CHUNK, RATE_LIMITED, BUDGET_EXCEEDED, NOT_ENTITLED, "not_admitted"})
"""Nack codes that refuse a chunk request (``not_admitted``: the coordinator's admission check).
A fetcher that gets one backs off and asks again, a bounded number of times."""


NACK_INTERVAL_SECONDS = 1.0
"""A client over a limit gets at most one nack per limit in this time; every refusal is counted."""


@dataclass
class _Source:
    path: Path
    offset: int
    length: int
    stamp: tuple[int, int]  # (size, mtime_ns) when the manifest was added


@dataclass
class _Allowance:
    """What one client may still ask of us: a token bucket of requests and bytes sent per blob."""

    requests: TokenBucket
    sent: Counter[str] = field(default_factory=Counter)  # blob id -> bytes sent
    nacked_at: dict[str, float] = field(default_factory=dict)  # nack code -> when last sent


class BlobServer:
    """Coordinator side: answers chunk requests for the manifests it holds.

    The owner decodes each message from a ``chunkreq`` topic and hands the request to
    :meth:`serve`, its one entry point. Chunks are read from the source files only when
    requested (memory stays at one chunk per request being served) and published to the
    requester's ``chunk`` topic. A source file whose size or mtime changed since :meth:`add`
    is refused rather than re-hashed on every read (sha256 runs at ~250 MB/s on small CPUs;
    the receiver verifies every chunk anyway). Requests are capped at
    ``max_hashes_per_request`` chunks; the client's window keeps below that.

    Nothing a client asks makes us send without bound: each client may ask
    ``requests_per_second`` times a second (a token bucket holding ``request_burst``), and is
    sent at most ``budget_factor`` times a package's bytes per package version (blob id), its
    re-requests included, and, given its tier, only the packages of that tier. Beyond either the request is refused with a :data:`RATE_LIMITED` or
    :data:`BUDGET_EXCEEDED` nack, counted in ``refused`` (nacks themselves at most one per
    limit per :data:`NACK_INTERVAL_SECONDS`, so a flood of requests is not answered by a flood
    of nacks). The owner serves admitted clients only, which bounds the clients tracked here.

    Args:
        transport: Connected transport used to publish chunks and nacks.
        run: Run id.
        signer: The coordinator's signing key (clients refuse unsigned chunks and nacks).
        sender: Envelope sender (the coordinator's id).
        max_hashes_per_request: Chunks served per request at most (bounds queued memory).
        refused: Counts each refusal by its nack code (the owner's refusal counters).
        budget_factor: Bytes a client may be sent of a package, as a multiple of its size.
        requests_per_second: Chunk requests a client may make per second, sustained.
        request_burst: Chunk requests a client may make at once (the bucket's size).
        clock: Monotonic seconds (tests pass their own).

    Raises:
        BlobError: A limit that is not a positive number.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        run: str,
        signer: SigningKey,
        sender: str = COORDINATOR_ID,
        max_hashes_per_request: int = 32,
        refused: Counter[str] | None = None,
        budget_factor: float = 3.0,
        requests_per_second: float = 50.0,
        request_burst: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not (budget_factor >= 1.0 and requests_per_second > 0 and request_burst >= 1):
            raise BlobError(
                f"budget_factor must be >= 1, requests_per_second > 0 and request_burst >= 1; got "
                f"{budget_factor}, {requests_per_second}, {request_burst}"
            )
        self.budget_factor = budget_factor
        self.requests_per_second = requests_per_second
        self.request_burst = request_burst
        self.clock = clock
        self._allowances: dict[str, _Allowance] = {}
        self._blob_bytes: dict[str, int] = {}
        self.transport = transport
        self.run = topics.check_id(run, "run id")
        self.signer = signer
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
        self._blob_bytes[manifest.blob_id] = sum(entry.size for entry in manifest.files)
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

    def serve(
        self, client_id: str, request: ChunkRequest, *, ref_message_id: str = "", round: int = -1, tier: str | None = None
    ) -> int:
        """Publish the requested chunks to ``client_id``; nack what cannot be served.

        Args:
            client_id: Requesting client.
            request: Its request.
            ref_message_id: The request's message id (quoted in a nack).
            round: Round for the envelopes.
            tier: The tier the client was assigned: it is served that tier's packages only
                (None: any package served).

        Returns:
            Number of chunks published.
        """
        # Cheapest first: a flood of requests costs one token check each, nothing more.
        if not self._take_request_token(client_id):
            self._refuse_limited(
                client_id, ref_message_id, round, RATE_LIMITED,
                f"more than {self.requests_per_second:g} chunk requests a second (bursts of "
                f"{self.request_burst}); ask again more slowly",
            )
            return 0
        if request.blob_id not in self.manifests:
            self._nack(
                client_id,
                ref_message_id,
                round,
                UNKNOWN_BLOB,
                f"blob {request.blob_id[:12]} is not served (stale manifest?)",
            )
            return 0
        if tier is not None and self.manifests[request.blob_id].tier != tier:
            self._refuse_limited(
                client_id, ref_message_id, round, NOT_ENTITLED,
                f"blob {request.blob_id[:12]} is the package of tier {self.manifests[request.blob_id].tier}, "
                f"and this client was assigned tier {tier}",
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
        sent = self._allowance(client_id).sent
        budget = int(self.budget_factor * self._blob_bytes[request.blob_id])
        unknown: list[str] = []
        for digest in hashes:
            source = self._index.get(digest)
            if source is not None and sent[request.blob_id] + source.length > budget:
                self._refuse_limited(
                    client_id, ref_message_id, round, BUDGET_EXCEEDED,
                    f"already sent {sent[request.blob_id]} bytes of blob {request.blob_id[:12]}, "
                    f"{self.budget_factor:g}x its {self._blob_bytes[request.blob_id]} bytes: no more of it to this client",
                )
                break
            try:
                data = self.read_chunk(digest)
            except BlobError as exc:
                unknown.append(str(exc))
                continue
            payload = codec.encode(
                MessageType.CHUNK,
                Chunk(blob_id=request.blob_id, hash=digest, data=data),
                run=self.run,
                round=round,
                sender=self.sender,
                signer=self.signer,
            )
            self.transport.publish(topic, payload, qos=1)
            served += 1
            self.bytes_served += len(data)
            sent[request.blob_id] += len(data)
        if unknown:  # one nack per request, however many of its chunks we lack
            more = f" (and {len(unknown) - 1} more of this request)" if len(unknown) > 1 else ""
            self._nack(client_id, ref_message_id, round, UNKNOWN_CHUNK, unknown[0] + more)
        self.chunks_served += served
        return served

    def _allowance(self, client_id: str) -> _Allowance:
        allowance = self._allowances.get(client_id)
        if allowance is None:
            bucket = TokenBucket(self.requests_per_second, self.request_burst, self.clock)
            allowance = self._allowances[client_id] = _Allowance(bucket)
        return allowance

    def _take_request_token(self, client_id: str) -> bool:
        """Refill the client's bucket for the time passed and take one request from it, if it holds one."""
        return self._allowance(client_id).requests.take()

    def _refuse_limited(self, client_id: str, ref: str, round: int, code: str, reason: str) -> None:
        """Refuse a request over a limit: always counted, nacked at most once per NACK_INTERVAL_SECONDS."""
        allowance = self._allowance(client_id)
        now = self.clock()
        last = allowance.nacked_at.get(code)
        if last is not None and now - last < NACK_INTERVAL_SECONDS:
            self.refused[code] += 1
            log.debug("refused chunk request of %s: [%s] (nack already sent %.2f s ago)", client_id, code, now - last)
            return
        allowance.nacked_at[code] = now
        self._nack(client_id, ref, round, code, reason)  # counts it

    def _nack(self, client_id: str, ref: str, round: int, code: str, reason: str) -> None:
        self.refused[code] += 1
        log.warning("refused chunk request on %s: [%s] %s", topics.chunkreq(self.run, client_id), code, reason)
        body = Nack(client_id=client_id, round=round, ref_message_id=ref, code=code, reason=reason)
        payload = codec.encode(MessageType.NACK, body, run=self.run, round=round, sender=self.sender, signer=self.signer)
        self.transport.publish(topics.nack(self.run, client_id), payload, qos=1)


def _stamp(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, or (-1, -1) if it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)
