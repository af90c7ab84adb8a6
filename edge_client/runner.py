"""The edge client's loop: hello, preflight, fetch, train, send; carry on after disconnects.

One thread owns everything: ``transport.poll`` hands retained state (schedule, manifests,
global adapter) and replies (assignment, nacks) to handlers that only record them; the loop
then decides what to do next from that state. Because the schedule, manifests and adapter
are retained, a client that reconnects or restarts learns the current round at once.

Nothing received is trusted: every message must be signed by the coordinator key the client
pinned (checked before its bytes are even unpacked, :mod:`shared.signing`), is decoded, must
come from the coordinator, and is checked (:mod:`edge_client.inbound`) before it replaces
what the client holds; a bad, unsigned, forged or stale one is refused (logged as ``refused message on <topic>: [<reason>] <detail>`` and
counted in ``ClientOutcome.refused``) and the client carries on with what it had.

No message after admission ends the client: a nack is recorded, a refused or stalled download
is tried again with backoff (:data:`FETCH_ATTEMPTS` times per round, then the round is given
up and the client waits for the next schedule). What still ends it comes from its own
assignment (a refused hello), its own device (the tier does not fit, memory runs out) or the
run itself (a finished or failed schedule; a task its data cannot take).

What survives a crash lives in the state folder: verified sub-LLM chunks (so a broken
download resumes), the rounds already sent (so a restart does not train twice), the
mid-round training checkpoint (so a restart resumes from the last saved step,
:mod:`edge_client.train_checkpoint`), and a trained update the broker has not acknowledged
yet (so a restart sends it again instead of losing it: a round counts as sent only once the
broker has acknowledged its update, :mod:`edge_client.outbox`).

This module is over 600 lines because the client is one class whose handlers and loop
share the state it holds; what it sent (:mod:`edge_client.outbox`), its checks
(:mod:`edge_client.inbound`) and its training (:mod:`edge_client.trainer`) live elsewhere.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edge_client.data import LocalDataset, LocalRows, build_dataset
from edge_client.inbound import (
    Refusal,
    adapter_refusal,
    assignment_refusal,
    check_adapter,
    check_addressed_to,
    check_manifest,
    check_schedule,
    manifest_refusal,
    schedule_refusal,
)
from edge_client.memory_cap import out_of_memory_guard
from edge_client.outbox import Outbox
from edge_client.preflight import preflight
from edge_client.privacy import privatize
from edge_client.resources import ResourceTracker
from edge_client.train_checkpoint import clear_checkpoint, load_checkpoint
from edge_client.trainer import TrainOptions, TrainProgress, train_adapter
from shared import codec, topics
from shared.blob_fetcher import BlobFetcher, FetchProgress
from shared.blob_server import DOWNLOAD_REFUSALS
from shared.chunkstore import ChunkStore
from shared.errors import (
    BlobError,
    FedSodaError,
    InsufficientMemoryError,
    ProtocolError,
    RunStateError,
    TopicError,
)
from shared.manifests import check_chunk
from shared.protocol import (
    COORDINATOR_ID,
    Assignment,
    DeviceProfile,
    GlobalAdapter,
    Hello,
    Manifest,
    MessageType,
    Nack,
    Presence,
    Schedule,
    Update,
    dp_noise_std,
)
from shared.signing import SigningKey, VerifyKey
from shared.subllm import load_package
from shared.tensors import payloads_digest, payloads_to_state, state_to_payloads
from shared.transport import MqttTransport
from shared.transport_types import (
    ConnectionEvent,
    InboundMessage,
    TransportConfig,
    Will,
)
from shared.typed import short_repr

log = logging.getLogger(__name__)

SOFTWARE_VERSION = "fedsoda 0.1.0"
HELLO_RETRY_SECONDS = 5.0
"""How often a hello is repeated while no assignment has come (a hello is not retained)."""
ACK_WAIT_SECONDS = 10.0
"""How long sending an update blocks for the broker's acknowledgement before the loop goes on waiting."""
MAX_LEAVE_REASON_CHARS = 400
"""The offline presence of a client that stops on an error carries the error, cut to this length."""
MAX_NACKS_KEPT = 100
"""Nacks kept for the outcome (the latest ones): a flood of them must not grow the client's memory."""
FETCH_ATTEMPTS = 3
"""Downloads of one package tried per round before the client gives the round up and waits for the next schedule."""
FETCH_RETRY_SECONDS = 5.0
"""Wait before the second download attempt; it doubles for each further one (with jitter)."""


@dataclass(frozen=True)
class ClientOptions:
    """How an edge client joins a run.

    Attributes:
        run_id: Run to join.
        client_id: This client's stable id.
        state_dir: Folder for the chunk cache, sent-round record and training checkpoints.
        coordinator_key: The coordinator's public key: every message on a coordinator topic
            must be signed by it (an unsigned or forged one is refused).
        signing_key: This client's own key: it signs everything the client sends, and its
            public key travels in the hello (the coordinator pins it). None sends unsigned
            messages, as clients older than protocol 1.3 do (``join`` always has a key).
        device: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA when present and the profile says so).
        checkpoint_every: Save the mid-round training state every this many steps (0: never).
        idle_timeout: Seconds to wait with nothing to do before giving up (None: for ever).
        memory_limit_bytes: The memory cap this process runs under
            (:func:`edge_client.memory_cap.apply_memory_cap`), None without one: the preflight
            checks against it and running out of memory names it.
    """

    run_id: str
    client_id: str
    state_dir: Path
    coordinator_key: VerifyKey
    signing_key: SigningKey | None = None
    device: str = "auto"
    checkpoint_every: int = 5
    idle_timeout: float | None = None
    memory_limit_bytes: int | None = None


@dataclass
class ClientEvents:
    """Callbacks a CLI hooks in to draw progress (all optional).

    Attributes:
        on_status: A one-line status message.
        on_fetch: Chunk download progress.
        on_train: Training step progress.
    """

    on_status: Callable[[str], None] = lambda _msg: None
    on_fetch: Callable[[FetchProgress], None] = lambda _p: None
    on_train: Callable[[TrainProgress], None] = lambda _p: None


@dataclass
class ClientOutcome:
    """How a ``join`` ended.

    Attributes:
        client_id: This client's id.
        status: ``"finished"`` (the run finished), ``"failed"`` (the run failed) or ``"stopped"``.
        reason: Why, in words.
        rounds_sent: Rounds this client sent an update for.
        bytes_sent: Bytes this client published (MQTT payload + topic).
        bytes_received: Bytes this client received.
        chunks_fetched: Sub-LLM chunks downloaded.
        chunks_reused: Sub-LLM chunks found in the cache.
        nacks: The latest refusals received (at most :data:`MAX_NACKS_KEPT`), as
            ``{"round", "code", "reason"}``.
        refused: Inbound messages this client refused, by reason (error class, ``stale``,
            or ``internal_error``); each is also logged with its topic and detail.
    """

    client_id: str
    status: str
    reason: str
    rounds_sent: list[int]
    bytes_sent: int
    bytes_received: int
    chunks_fetched: int = 0
    chunks_reused: int = 0
    nacks: list[dict[str, Any]] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)


class EdgeClient:
    """Joins a run and trains whenever the schedule names this client.

    Args:
        options: Who and where.
        transport_config: Broker connection (its client_id must equal ``options.client_id``).
        profile: The detected (or overridden) hardware profile.
        rows: The local training data as read at start; the schedule's task formats it.
        events: Progress callbacks.
        measure_profile: Re-measures the device just before the download (preflight);
            None reuses ``profile``.
    """

    def __init__(
        self,
        options: ClientOptions,
        transport_config: TransportConfig,
        profile: DeviceProfile,
        rows: LocalRows,
        events: ClientEvents | None = None,
        measure_profile: Callable[[], DeviceProfile] | None = None,
    ) -> None:
        self.options = options
        self.measure_profile = measure_profile
        self.profile = profile
        self.rows = rows
        self.dataset: LocalDataset | None = None  # the rows formatted with the schedule's task
        self.events = events or ClientEvents()
        self.run_id = topics.check_id(options.run_id, "run id")
        self.client_id = topics.check_id(options.client_id, "client id")
        options.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = ChunkStore(options.state_dir / "chunks")
        self.transport = MqttTransport(transport_config, will=Will(topics.presence(self.run_id, self.client_id), self._presence(False, "connection lost")))
        self.assignment: Assignment | None = None
        self.schedule: Schedule | None = None
        self.manifests: dict[str, Manifest] = {}
        self.adapter: GlobalAdapter | None = None
        self.nacks: deque[dict[str, Any]] = deque(maxlen=MAX_NACKS_KEPT)
        self.refused: Counter[str] = Counter()
        self._fetching = False  # while a BlobFetcher runs, chunk messages are its own
        self.outbox = Outbox(options.state_dir, self.run_id, self.client_id, self.transport)
        self._schedule_seen: Schedule | None = None
        self._loaded: tuple[str, Any, Any, Any] | None = None  # (blob_id, model, tokenizer, PackageMeta)
        self._fetch_stats = [0, 0]
        self._inbound: dict[str, Callable[[str, Any], None]] = {}  # topic filter -> handler
        self._manifests_resynced: frozenset[tuple[str, str]] | None = None
        # Failed downloads per (round, blob id), and when the next attempt may start.
        self._fetch_failures: Counter[tuple[int, str]] = Counter()
        self._fetch_retry_at = 0.0
        self._hello_at = 0.0
        self._hellos_sent = 0
        self._preflight_done = False

    # ------------------------------------------------------------------ messages

    def _presence(self, online: bool, reason: str) -> bytes:
        body = Presence(client_id=self.client_id, online=online, reason=reason)
        return codec.encode(MessageType.PRESENCE, body, run=self.run_id, round=-1, sender=self.client_id, signer=self.options.signing_key)

    def _announce(self, online: bool, reason: str) -> None:
        """Publish our retained presence (the Last Will carries the offline one)."""
        self.transport.publish(topics.presence(self.run_id, self.client_id), self._presence(online, reason), qos=1, retain=True)

    def _publish(self, topic: str, msg_type: MessageType, body: Any, *, round_: int = -1, retain: bool = False) -> None:
        payload = codec.encode(msg_type, body, run=self.run_id, round=round_, sender=self.client_id, signer=self.options.signing_key)
        self.transport.publish(topic, payload, qos=1, retain=retain)

    def _subscribe(self) -> None:
        handlers: dict[str, Callable[[str, Any], None]] = {
            topics.assign(self.run_id, self.client_id): self._on_assignment,
            topics.nack(self.run_id, self.client_id): self._on_nack,
            topics.schedule(self.run_id): self._on_schedule,
            topics.manifest(self.run_id, "+"): self._on_manifest,
            topics.adapter(self.run_id): self._on_adapter,
        }
        self._inbound = handlers
        for topic_filter, handler in handlers.items():
            self.transport.subscribe(topic_filter, self._guarded(handler))
        # Chunks are the fetcher's while it runs; outside a download they are refused or ignored here.
        on_chunk = self._guarded(self._on_stray_chunk)
        self.transport.subscribe(topics.chunk(self.run_id, self.client_id), lambda m: None if self._fetching else on_chunk(m))

    def _guarded(self, handler: Callable[[str, Any], None]) -> Callable[[InboundMessage], None]:
        """Verify the signature, decode, check the sender, and hand the envelope on; refuse (log, count) what fails."""

        def run_handler(message: InboundMessage) -> None:
            try:
                # Signed by the pinned key, or refused before a single field is read.
                info, envelope = codec.decode_message(
                    message.topic, message.payload, run=self.run_id, verify_key=self.options.coordinator_key
                )
                if envelope.sender != COORDINATOR_ID:
                    raise TopicError(f"{info.kind} messages come from the coordinator, not from {short_repr(envelope.sender)}")
                handler(message.topic, envelope)
            except (ProtocolError, BlobError) as exc:
                self._refuse(message.topic, type(exc).__name__, str(exc))
            except Exception:  # a bug one message triggers must not stop the client
                self.refused["internal_error"] += 1
                log.exception("refused message on %s: [internal_error] handling it raised", message.topic)

        return run_handler

    def _refuse(self, topic: str, reason: str, detail: str) -> None:
        """Count and log one refused inbound message (the client keeps what it had)."""
        self.refused[reason] += 1
        log.warning("refused message on %s: [%s] %s", topic, reason, detail)

    def _refused_against_state(self, topic: str, refusal: Refusal | None) -> bool:
        """Refuse (log, count) a message that does not stand against what the client holds."""
        if refusal is None:
            return False
        self._refuse(topic, refusal.reason, refusal.detail)
        return True

    def _resync(self, topic_filter: str) -> None:
        """Subscribe to a filter afresh, so the broker sends its retained messages again."""
        self.transport.unsubscribe(topic_filter)
        self.transport.subscribe(topic_filter, self._guarded(self._inbound[topic_filter]))

    def _on_assignment(self, topic: str, envelope: Any) -> None:
        assignment: Assignment = envelope.body
        check_addressed_to(assignment, self.client_id)
        if self._refused_against_state(topic, assignment_refusal(assignment, self.assignment)):
            return
        self.assignment = assignment

    def _on_nack(self, topic: str, envelope: Any) -> None:
        nack: Nack = envelope.body
        check_addressed_to(nack, self.client_id)
        self.nacks.append({"round": nack.round, "code": nack.code, "reason": nack.reason})
        if nack.code not in DOWNLOAD_REFUSALS:  # the fetcher handles its own
            self.events.on_status(f"coordinator refused our message ({nack.code}): {nack.reason}")

    def _on_schedule(self, topic: str, envelope: Any) -> None:
        schedule: Schedule = envelope.body
        check_schedule(schedule)
        if self._refused_against_state(topic, schedule_refusal(schedule, self.schedule)):
            return
        self.schedule = schedule
        # What arrived before any schedule could bound it is checked now. An adapter ahead of
        # the schedule is not the coordinator's: drop it and ask for the retained one again.
        if self.adapter is not None and adapter_refusal(self.adapter, None, schedule) is not None:
            self._refuse(topics.adapter(self.run_id), "implausible_round",
                         f"held global adapter of round {self.adapter.round} is ahead of the schedule's round {schedule.round}")
            self.adapter = None
            self._resync(topics.adapter(self.run_id))
        # A held manifest that kept the named package out as stale (a forged higher version):
        # the retained one is taken now, as the schedule names it. Once per set of named
        # packages, so a flood of schedules cannot make us resubscribe in a loop.
        named = frozenset(schedule.manifests.items())
        if named != self._manifests_resynced and any(
            tier in self.manifests and self.manifests[tier].blob_id != blob_id for tier, blob_id in named
        ):
            self._manifests_resynced = named
            self._resync(topics.manifest(self.run_id, "+"))

    def _on_manifest(self, topic: str, envelope: Any) -> None:
        manifest: Manifest = envelope.body
        check_manifest(manifest, topics.parse(topic).tier)
        if self._refused_against_state(topic, manifest_refusal(manifest, self.manifests.get(manifest.tier), self.schedule)):
            return
        self.manifests[manifest.tier] = manifest

    def _on_adapter(self, topic: str, envelope: Any) -> None:
        adapter: GlobalAdapter = envelope.body
        check_adapter(adapter)
        if self._refused_against_state(topic, adapter_refusal(adapter, self.adapter, self.schedule)):
            return
        self.adapter = adapter

    def _on_stray_chunk(self, topic: str, envelope: Any) -> None:
        check_chunk(envelope)  # corrupt or forged data is refused even when nobody waits for it
        log.debug("ignoring chunk %s on %s: no download is running", envelope.body.hash[:12], topic)

    # ------------------------------------------------------------------ main loop

    def run(self, *, stop: Callable[[], bool] = lambda: False) -> ClientOutcome:
        """Join, then train each round this client is scheduled for, until the run ends.

        Args:
            stop: Polled in the loop; True leaves cleanly (presence goes offline).

        Returns:
            The outcome.

        Raises:
            InsufficientMemoryError: The coordinator refused this device, the assigned tier
                does not fit in the memory available now, or fetching, loading or training
                ran out of memory (under the cap, if one is set).
            BrokerError: The broker cannot be reached.
        """
        self.transport.connect()
        leave_reason = "left"
        try:
            return self._serve(stop)
        except FedSodaError as exc:
            # The offline presence is how the coordinator learns a client gave up: say why,
            # so its log shows "client-1 is offline (failed: ran out of memory ...)".
            leave_reason = f"failed: {exc}"[:MAX_LEAVE_REASON_CHARS]
            raise
        finally:
            self._leave(leave_reason)

    def _serve(self, stop: Callable[[], bool]) -> ClientOutcome:
        self._announce(True, "joined")
        self._subscribe()
        # Trained before a crash but never acknowledged: send it again rather than lose it.
        resent = self.outbox.resend_unacked()
        if resent is not None:
            self.events.on_status(f"round {resent}: re-sending the update the broker never acknowledged")
        idle_since = time.monotonic()
        while not stop():
            event = self.transport.poll(0.5)
            acknowledged = self.outbox.check_acknowledged(timeout=0.0)
            if acknowledged is not None:
                self.events.on_status(f"round {acknowledged}: the broker acknowledged our update")
            if isinstance(event, ConnectionEvent) and event.connected:
                if self.transport.reconnects:
                    # The broker may have lost our presence (restart without persistence): restate
                    # it. The first connection's presence went out above, as "joined".
                    self._announce(True, "reconnected")
                self.outbox.connection_up(event.session_present)
            schedule = self.schedule
            if schedule is not self._schedule_seen:
                self._schedule_seen = schedule
                self._format_rows(schedule)
                if self.outbox.resend_if_still_awaited(schedule):
                    self.events.on_status(f"round {schedule.round}: the broker lost its state; sending our update again")
            if schedule is not None and schedule.status in ("finished", "failed"):
                # Before the assignment: a client (re)joining a run that has just ended gets
                # no assignment any more, only the retained final schedule.
                return self._outcome(schedule.status, "the run " + schedule.status)
            if self.assignment is None:
                self._say_hello()
                continue
            if not self.assignment.accepted:
                raise InsufficientMemoryError(f"the coordinator did not admit this device: {self.assignment.reason}")
            if not self._preflight_done:
                self._check_fits()
            if schedule is None:
                continue
            if self._ready_to_train(schedule):
                self._train_and_send(schedule)
                idle_since = time.monotonic()
            elif self.options.idle_timeout is not None and time.monotonic() - idle_since > self.options.idle_timeout:
                return self._outcome("stopped", f"nothing to do for {self.options.idle_timeout:g} s")
        return self._outcome("stopped", "stopped on request")

    def _format_rows(self, schedule: Schedule) -> None:
        """Format the local rows with the schedule's task, once per task.

        Raises:
            RunStateError: The coordinator sends no task (it speaks protocol 1.0).
            DataError: A local row does not fit the task (named by file and line): this data
                cannot take part, so the client stops before any download or training.
        """
        if schedule.task is None:
            raise RunStateError(
                "the coordinator's schedule carries no task: it speaks protocol 1.0, and this client "
                f"({SOFTWARE_VERSION}) formats its data with the task the coordinator sends: upgrade the coordinator"
            )
        if self.dataset is None or self.dataset.task != schedule.task:
            self.dataset = build_dataset(self.rows, schedule.task)
            task = schedule.task
            self.events.on_status(
                f"{len(self.dataset)} local rows formatted for the task {task.name or task.kind} ({task.kind}, {task.metric})"
            )

    def _say_hello(self) -> None:
        # A hello sent before the coordinator subscribed is lost (it is not retained): repeat it.
        if time.monotonic() - self._hello_at < HELLO_RETRY_SECONDS:
            return
        self._hello_at = time.monotonic()
        hello = Hello(client_id=self.client_id, profile=self.profile, num_examples=len(self.rows), software_version=SOFTWARE_VERSION,
                      public_key=self.options.signing_key.public.text if self.options.signing_key else "")
        self._publish(topics.hello(self.run_id, self.client_id), MessageType.HELLO, hello)
        # Said once; the repeats (every few seconds while the coordinator prepares its tiers,
        # which can take minutes) are for the coordinator, not for the person watching.
        if not self._hellos_sent:
            self.events.on_status(f"said hello to run {self.run_id}; waiting for an assignment")
        else:
            log.debug("said hello to run %s again (%d)", self.run_id, self._hellos_sent + 1)
        self._hellos_sent += 1

    def _check_fits(self) -> None:
        manifest = self.manifests.get(self.assignment.tier)
        if manifest is None:
            return  # the retained manifest arrives right after subscribing
        now = self.measure_profile() if self.measure_profile is not None else self.profile
        verdict = preflight(manifest, self.assignment.plan, now, self.options.memory_limit_bytes)
        if not verdict.fits:
            raise InsufficientMemoryError(verdict.reason)
        self.events.on_status(verdict.reason)  # "<tier> fits: needs ..., <budget source> gives ..."
        self._preflight_done = True

    def _ready_to_train(self, schedule: Schedule) -> bool:
        if schedule.status != "running" or self.outbox.holds(schedule.round):
            return False
        tier = schedule.participants.get(self.client_id)
        if tier is None:
            return False
        manifest = self.manifests.get(tier)
        if manifest is None or manifest.blob_id != schedule.manifests.get(tier):
            return False  # the matching retained manifest has not arrived yet
        if self._fetch_failures[(schedule.round, manifest.blob_id)] >= FETCH_ATTEMPTS:
            return False  # given up for this round: the next schedule is another chance
        if time.monotonic() < self._fetch_retry_at:
            return False  # a failed download waits before its next attempt
        return self.adapter is not None and self.adapter.round == schedule.adapter_round

    def _model_for(self, manifest: Manifest) -> tuple[Any, Any, Any]:
        if self._loaded is not None and self._loaded[0] == manifest.blob_id:
            return self._loaded[1], self._loaded[2], self._loaded[3]
        self._loaded = None  # free the old version before loading the new one
        self.events.on_status(f"fetching sub-LLM {manifest.tier} v{manifest.version}")
        fetcher = BlobFetcher(self.transport, self.store, run=self.run_id, client_id=self.client_id,
                              coordinator_key=self.options.coordinator_key, signer=self.options.signing_key,
                              progress=self.events.on_fetch, refused=self.refused)
        self._fetching = True
        try:
            folder = fetcher.fetch(manifest, self.options.state_dir / "packages" / manifest.blob_id)
        finally:
            self._fetching = False
        self._fetch_stats[0] += fetcher.stats.fetched
        self._fetch_stats[1] += fetcher.stats.reused
        self.events.on_status(f"sub-LLM ready: {fetcher.stats.fetched} chunks fetched, {fetcher.stats.reused} reused from the cache")
        model, tokenizer, meta = load_package(folder, device=self._device())
        self._loaded = (manifest.blob_id, model, tokenizer, meta)
        return model, tokenizer, meta

    def _download_failed(self, round_num: int, manifest: Manifest, exc: BlobError) -> None:
        """Count a failed download of this round's package; retry later with backoff, or give the round up."""
        key = (round_num, manifest.blob_id)
        for old in [k for k in self._fetch_failures if k[0] < round_num]:
            del self._fetch_failures[old]  # one entry per round at most, ever
        self._fetch_failures[key] += 1
        failures = self._fetch_failures[key]
        what = f"round {round_num}: the download of sub-LLM {manifest.tier} v{manifest.version} failed ({exc})"
        if failures >= FETCH_ATTEMPTS:
            log.error("%s; gave up after %d attempts, waiting for the next schedule", what, failures)
            self.events.on_status(f"{what}; gave up after {failures} attempts, waiting for the next schedule")
            return
        ceiling = FETCH_RETRY_SECONDS * 2 ** (failures - 1)
        delay = random.uniform(ceiling / 2, ceiling)  # jitter: clients refused together do not return together
        self._fetch_retry_at = time.monotonic() + delay
        log.warning("%s; attempt %d of %d in %.0f s", what, failures + 1, FETCH_ATTEMPTS, delay)
        self.events.on_status(f"{what}; trying again in {delay:.0f} s (attempt {failures + 1} of {FETCH_ATTEMPTS})")

    def _device(self) -> str:
        if self.options.device != "auto":
            return self.options.device
        return "cuda" if self.profile.accelerator == "cuda" and torch.cuda.is_available() else "cpu"

    def _memory_guard(self, what: str):
        """Allocation failures inside the block end the client with the cap and the plan's estimate."""
        estimate = self.assignment.plan.get("estimate_bytes") if self.assignment is not None else None
        return out_of_memory_guard(what, limit_bytes=self.options.memory_limit_bytes, estimate_bytes=estimate)

    def _train_and_send(self, schedule: Schedule) -> None:
        round_num = schedule.round
        tier = schedule.participants[self.client_id]
        manifest = self.manifests[tier]
        try:
            with self._memory_guard(f"fetching and loading sub-LLM {tier}"):
                model, tokenizer, meta = self._model_for(manifest)
        except BlobError as exc:
            # A refusal (a nack, perhaps forged), a transfer that stalled, chunks that keep
            # failing verification: none is a reason to leave the run.
            self._download_failed(round_num, manifest, exc)
            return
        checkpoint_dir = self.options.state_dir / "train"
        resume = load_checkpoint(checkpoint_dir)
        if resume is not None and resume.round_num != round_num:
            resume = None  # a checkpoint of an earlier round is of no use now
        assert self.dataset is not None  # formatted when the schedule arrived
        # The adapter may be replaced by the handler thread while we train: keep the one we start from.
        base = self.adapter
        assert base is not None  # _ready_to_train checked it is the schedule's
        self.events.on_status(f"round {round_num}: training {schedule.training.local_steps} steps on {len(self.dataset)} examples")
        with self._memory_guard(f"training round {round_num}"), ResourceTracker(device_class=self.profile.device_class) as tracker:
            result = train_adapter(
                model,
                tokenizer,
                self.dataset,
                schedule.training,
                payloads_to_state(base.tensors),
                list(meta.layer_map),
                meta.layers_prefix,
                self._device(),
                TrainOptions(
                    round_num=round_num,
                    progress_cb=self.events.on_train,
                    resume_state=resume,
                    gradient_checkpointing=bool(self.assignment.plan.get("grad_checkpointing", False)),
                    checkpoint_dir=checkpoint_dir,
                    checkpoint_every=self.options.checkpoint_every,
                ),
            )
        report = tracker.report(bytes_sent=self.transport.bytes_sent, bytes_received=self.transport.bytes_received)
        delta = result.delta
        training = schedule.training
        if training.dp_clip_norm > 0:  # DP-FedAvg: the noise is ours to add, before anything leaves
            std = dp_noise_std(training.dp_clip_norm, training.dp_noise_multiplier, len(schedule.participants))
            delta, factor = privatize(delta, training.dp_clip_norm, std)
            self.events.on_status(f"round {round_num}: DP-FedAvg clipped the delta by {factor:.3g} and added noise of std {std:.3g}")
        update = Update(
            client_id=self.client_id,
            round=round_num,
            num_examples=result.num_examples,
            delta=state_to_payloads(delta),
            metrics=result.metrics,
            resources=report,
            # What it started from: the coordinator refuses an update that names another adapter.
            base_round=base.round,
            base_digest=payloads_digest(base.tensors),
        )
        self.outbox.send(round_num, codec.encode(MessageType.UPDATE, update, run=self.run_id, round=round_num, sender=self.client_id,
                                                 signer=self.options.signing_key))
        clear_checkpoint(checkpoint_dir)
        loss = result.metrics.get("loss_last", float("nan"))
        if self.outbox.check_acknowledged(timeout=ACK_WAIT_SECONDS) is not None:
            self.events.on_status(f"round {round_num}: sent update (loss {loss:.3f})")
        else:
            self.events.on_status(f"round {round_num}: update (loss {loss:.3f}) waits for the broker's acknowledgement")

    def _outcome(self, status: str, reason: str) -> ClientOutcome:
        return ClientOutcome(
            client_id=self.client_id,
            status=status,
            reason=reason,
            rounds_sent=list(self.outbox.sent),
            bytes_sent=self.transport.bytes_sent,
            bytes_received=self.transport.bytes_received,
            chunks_fetched=self._fetch_stats[0],
            chunks_reused=self._fetch_stats[1],
            nacks=list(self.nacks),
            refused=dict(self.refused),
        )

    def _leave(self, reason: str = "left") -> None:
        try:
            if self.transport.connected:
                self._announce(False, reason)
                self.transport.flush(timeout=5.0)
        except FedSodaError as exc:
            log.warning("could not announce leaving: %s", exc)
        finally:
            self.transport.close()
