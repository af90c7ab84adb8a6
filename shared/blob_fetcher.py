"""The client's side of a blob transfer: fetching what its chunk store lacks.

A :class:`BlobFetcher` asks the coordinator for the chunks of a manifest that its
:class:`~shared.chunkstore.ChunkStore` lacks, a bounded window at a time, verifies each
chunk, re-requests missing or corrupt ones, and finally materializes the folder atomically.
Every chunk and nack must be signed by the pinned coordinator key: an unsigned or forged one
(a stranger's nack could otherwise stop the download) is refused like a corrupt one.
Because the store keeps every verified chunk, a broken transfer or a restart costs only the
chunks not yet stored. A refusal (a nack with a :data:`~shared.blob_server.DOWNLOAD_REFUSALS`
code: rate limited, over budget, an unknown chunk) does not end the download: the fetcher
pauses with backoff and asks again, within each chunk's ``max_attempts``.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared import codec, topics
from shared.blob_server import DOWNLOAD_REFUSALS
from shared.chunkstore import ChunkStore, is_materialized, materialize
from shared.errors import BlobError, ChunkHashMismatchError, ProtocolError
from shared.manifests import check_chunk, chunk_lengths, validate_manifest
from shared.protocol import Chunk, ChunkRequest, Manifest, MessageType, Nack
from shared.signing import SigningKey, VerifyKey
from shared.transport_types import ConnectionEvent, InboundMessage, Transport

log = logging.getLogger(__name__)


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
        re_requests: Chunks asked for again (timeout, reconnect, corruption, refusal).
        refusals: Nacks that refused a request of this fetch (each pauses the requests).
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
    refusals: int = 0
    requested: list[str] = field(default_factory=list)


class BlobFetcher:
    """Client side: fetch a manifest's missing chunks and materialize its folder.

    :meth:`fetch`, its one entry point, drives the transport itself (``transport.poll``), so
    while it runs every other message still reaches its handlers. Each fetch keeps at most
    ``window`` chunks in flight; when no chunk arrives for ``request_timeout`` seconds, or
    the connection comes back, the in-flight ones are asked for again, up to
    ``max_attempts`` times each. A refusing nack pauses requests for ``nack_backoff``
    seconds, doubling (with jitter, up to ``request_timeout``) for each refusal without a
    chunk in between, then asks for the in-flight chunks again; nacks during a pause add
    nothing, so a flood of them costs one re-request per pause.

    Args:
        transport: Connected transport (persistent session recommended).
        store: On-disk chunk cache.
        run: Run id.
        client_id: This client's id (its chunk topics).
        coordinator_key: The pinned coordinator key every chunk and nack must be signed by.
        signer: This client's own key, which signs its chunk requests (None: unsigned).
        window: Chunks in flight at most.
        request_timeout: Seconds without progress before re-requesting.
        max_attempts: Requests per chunk before giving up.
        nack_backoff: Seconds the first refusal pauses requests.
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
        coordinator_key: VerifyKey,
        signer: SigningKey | None = None,
        window: int = 8,
        request_timeout: float = 20.0,
        max_attempts: int = 6,
        nack_backoff: float = 1.0,
        progress: Callable[[FetchProgress], None] | None = None,
        refused: Counter[str] | None = None,
    ) -> None:
        if window < 1:
            raise BlobError(f"window must be at least 1, got {window}")
        self.transport = transport
        self.store = store
        self.run = topics.check_id(run, "run id")
        self.client_id = topics.check_id(client_id, "client id")
        self.coordinator_key = coordinator_key
        self.signer = signer
        self.window = window
        self.request_timeout = request_timeout
        self.max_attempts = max_attempts
        self.nack_backoff = nack_backoff
        self.progress = progress
        self.refused: Counter[str] = Counter() if refused is None else refused
        self.stats = FetchStats()
        self._lengths: dict[str, int] = {}
        self._pending: dict[str, None] = {}  # an ordered set: requested in manifest order
        self._inflight: dict[str, int] = {}
        self._done: set[str] = set()
        self._fresh: set[str] = set()
        self._blob_id = ""
        self._paused_until = 0.0  # a refusal pauses requests until then
        self._refusals_in_a_row = 0  # since the last stored chunk: sets the next pause
        self._retry_after_pause = False
        self._last_refusal = ""  # named when a chunk runs out of attempts
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
            BlobError: The manifest is inconsistent, a chunk failed ``max_attempts`` times
                (timeouts, corruption and refusals all count), or ``timeout`` passed.
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
        self._paused_until, self._refusals_in_a_row, self._retry_after_pause = 0.0, 0, False
        self._last_refusal = ""
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
            paused = time.monotonic() < self._paused_until
            if not paused:
                if self._retry_after_pause:
                    # What was refused is still in flight: ask again, each chunk within max_attempts.
                    self._retry_after_pause = False
                    self._re_request(list(self._inflight), "refused; asking again after the pause")
                self._top_up()
            event = self.transport.poll(0.2)
            if isinstance(event, ConnectionEvent):
                if not event.connected:
                    link_lost = True
                elif link_lost:
                    # Chunks in flight when the link dropped may be gone: ask again right away.
                    link_lost = False
                    if paused:
                        self._retry_after_pause = True
                    else:
                        self._re_request(list(self._inflight), "reconnected")
            now = time.monotonic()
            if not paused and now - self._last_activity > self.request_timeout and self._inflight:
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
            signer=self.signer,
        )
        self.transport.publish(topics.chunkreq(self.run, self.client_id), payload, qos=1)
        self._last_activity = time.monotonic()

    def _re_request(self, digests: list[str], why: str) -> None:
        if not digests:
            return
        for digest in digests:
            self._inflight[digest] += 1
            if self._inflight[digest] > self.max_attempts:
                last = f" (last refusal: {self._last_refusal})" if self._last_refusal else ""
                raise BlobError(
                    f"chunk {digest[:12]} of blob {self._blob_id[:12]} still missing after {self.max_attempts} requests{last}"
                )
        log.info("re-requesting %d chunks (%s)", len(digests), why)
        self.stats.re_requests += len(digests)
        self._request(digests)

    def _on_chunk_message(self, message: InboundMessage) -> None:
        try:
            _info, envelope = codec.decode_message(message.topic, message.payload, run=self.run, verify_key=self.coordinator_key)
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
        self._refusals_in_a_row = 0  # the coordinator serves us: a next refusal pauses briefly again
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
            _info, envelope = codec.decode_message(message.topic, message.payload, run=self.run, verify_key=self.coordinator_key)
        except ProtocolError as exc:
            log.warning("dropped a bad nack: %s", exc)
            return
        nack: Nack = envelope.body
        if nack.code in DOWNLOAD_REFUSALS:
            self._refused(nack)

    def _refused(self, nack: Nack) -> None:
        """Pause requests after a refusal; what is in flight is asked for again when the pause ends.

        Never fatal by itself: a refusal may be a stranger's, a limit we hit, or a coordinator
        that restarted. Only a chunk that stays missing ``max_attempts`` times ends the fetch.
        """
        self.stats.refusals += 1
        self._last_refusal = f"{nack.code}: {nack.reason[:300]}"  # a stranger's nack must not flood the log
        now = time.monotonic()
        if now < self._paused_until:
            return  # this pause covers it
        ceiling = min(self.request_timeout, self.nack_backoff * 2 ** min(self._refusals_in_a_row, 30))
        delay = random.uniform(ceiling / 2, ceiling)
        self._refusals_in_a_row += 1
        self._paused_until = now + delay
        self._retry_after_pause = True
        log.warning(
            "blob %s: coordinator refused a chunk request (%s); asking again in %.1f s",
            self._blob_id[:12], self._last_refusal, delay,
        )

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
