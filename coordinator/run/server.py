"""The coordinator's only impure loop: MQTT in, round state machine, MQTT and disk out.

One thread owns everything. ``transport.poll`` hands each inbound message to a handler
registered here (paho's callbacks only enqueue), handlers turn messages into round events,
:func:`coordinator.run.rounds.step` turns events into actions, and this module carries the
actions out (publish, persist, aggregate, re-align, export). Model work lives behind the
:class:`ModelSide` protocol (implemented by :class:`coordinator.model.pipeline.ModelPipeline`,
bound in :mod:`coordinator.launch`), so this file is about ordering and safety:

* an update is validated, then persisted (fsync), and only then counted, so a coordinator
  killed at any moment restarts with ``serve --resume`` and loses no accepted update;
* nothing on the wire is trusted: every decode or validation failure, every message whose
  sender disagrees with its topic, every update from a client that is not assigned to the
  round it names or for a round that is not open, and every chunk request from a client that
  was never admitted is refused: logged as ``refused <kind> on <topic>: [<reason>] <detail>``,
  counted by reason (``ServerCounters.refused``, the run report's ``refused``), answered with
  a Nack where there is someone to answer, and the loop keeps serving.

This module is over 450 lines (about 580) because the server is one class: every handler and
action shares its state and its ordering rules, which is what this file is about; its checks
(:mod:`coordinator.run.inbound`), its clients' keys (:mod:`coordinator.run.client_keys`), its
aggregation (:mod:`coordinator.run.aggregation`), its report (:mod:`coordinator.run.reports`) and
its model side (:mod:`coordinator.run.model_side`) already live elsewhere.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.run import rounds
from coordinator.run.aggregation import (
    InfluenceLimits,
    RoundInfluence,
    aggregate_round,
    get_strategy,
)
from coordinator.run.checkpoint import RunDir, load_run
from coordinator.run.client_keys import ClientKeys
from coordinator.run.credentials import registry_client_keys, signing_key_file
from coordinator.run.inbound import (
    RoundContext,
    UpdateLimits,
    UpdateValidationError,
    check_chunk_request,
    check_hello,
    client_too_old,
    validate_update,
)
from coordinator.run.model_side import ModelSide, TierLike
from coordinator.run.privacy import privacy_report
from coordinator.run.reports import ServingTotals, write_report
from coordinator.run.round_events import (
    AggregationDone,
    AlignmentDone,
    ClientHello,
    ClientOffline,
    ClientOnline,
    Fail,
    Finish,
    PersistCheckpoint,
    PublishDone,
    PublishSchedule,
    RequestAggregation,
    SendNack,
    Start,
    StartAlignment,
    Tick,
    UpdateReceived,
)
from coordinator.settings import RunConfig
from shared import codec, topics
from shared.blob_server import BlobServer
from shared.errors import (
    FedSodaError,
    ProtocolError,
    RunStateError,
    TopicError,
)
from shared.protocol import (
    COORDINATOR_ID,
    Assignment,
    GlobalAdapter,
    Hello,
    MessageType,
    Nack,
    Presence,
    Schedule,
    TrainingParams,
    dp_noise_std,
)
from shared.rate import TokenBucket
from shared.signing import VerifyKey, load_or_create_signing_key
from shared.tensors import payloads_digest, state_to_payloads
from shared.topics import TopicKind
from shared.transport import MqttTransport
from shared.transport_types import ConnectionEvent, InboundMessage
from shared.typed import short_repr

log = logging.getLogger(__name__)

ASSIGNMENTS_FILE = "assignments.json"
TICK_SECONDS = 0.2
FAULT_PAUSE_ENV = "FEDSODA_FAULT_PAUSE"
"""Test hook for fault injection: ``FEDSODA_FAULT_PAUSE=aggregation:<round>`` makes the server
stop itself (SIGSTOP) in the middle of aggregating that round (FedAvg done, new global adapter
not yet saved), so a test can SIGKILL it at exactly that point (tests/faults). Unset, it costs
one dictionary lookup per aggregation; after SIGCONT the server carries on normally."""


def _bounded_note(influence: RoundInfluence) -> str:
    """What the influence bounds changed in a round, for the log (empty when nothing)."""
    capped = [c.client_id for c in influence.clients if c.weight < c.claimed_weight]
    clipped = [c.client_id for c in influence.clients if c.scale < 1.0 or c.key_scales]
    parts = []
    if capped:
        parts.append(f"weight capped: {', '.join(capped)}")
    if clipped:
        parts.append(f"clipped: {', '.join(clipped)}")
    if influence.skipped_keys:
        parts.append(f"{len(influence.skipped_keys)} key(s) held by too few clients left unchanged")
    return f" ({'; '.join(parts)})" if parts else ""


def _fault_pause(point: str) -> None:
    """Stop this process here if the fault-injection hook names ``point`` (see FAULT_PAUSE_ENV)."""
    if os.environ.get(FAULT_PAUSE_ENV) == point:
        log.warning("%s=%s: stopping this process for a fault-injection test", FAULT_PAUSE_ENV, point)
        os.kill(os.getpid(), signal.SIGSTOP)


@dataclass
class ServerCounters:
    """What the loop refused or ignored, by reason (for the run report).

    Attributes:
        refused: Inbound messages refused, keyed by reason: the error class of a decoding or
            topic failure (``MalformedMessageError``, ``TopicError`` ...), an update's
            rejection code (``nan``, ``not_assigned``, ``late`` ...), a chunk request's nack
            code (``not_admitted``, ``unknown_blob`` ...), or ``internal_error`` for a bug
            a message triggered.
        ignored: Well-formed messages with nothing to do (repeated updates), by kind.
    """

    refused: Counter = field(default_factory=Counter)
    ignored: Counter = field(default_factory=Counter)


@dataclass(frozen=True)
class RunOutcome:
    """How a ``serve`` ended.

    Attributes:
        status: ``"finished"`` or ``"failed"``.
        reason: Why it failed ("" when finished).
        run_dir: The run directory.
        results: Final results (export path, evaluation) when finished.
    """

    status: str
    reason: str
    run_dir: Path
    results: dict[str, Any]


class CoordinatorServer:
    """Runs one federated fine-tuning over MQTT.

    Args:
        config: The run configuration.
        run_dir: Run directory (created, or resumed from with ``resume=True``).
        pipeline: The prepared model side (tiers, adapters, re-alignment, export).
        transport: A connected transport with the coordinator's client id.
        resume: Carry on from the checkpoint in ``run_dir``.
        clock: Wall clock (seconds); injectable so tests can drive deadlines.
    """

    def __init__(
        self,
        config: RunConfig,
        run_dir: Path,
        pipeline: ModelSide,
        transport: MqttTransport,
        *,
        resume: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.transport = transport
        self.clock = clock
        self.run_id = config.run_id
        self.counters = ServerCounters()
        self._hellos = TokenBucket(config.validation.hellos_per_second, config.validation.hello_burst, clock=time.monotonic)
        self.strategy = get_strategy(config.aggregation.strategy, **config.aggregation.strategy_options())
        self.influence_limits = InfluenceLimits.from_settings(config.aggregation)
        self.task = config.task.spec()
        # Everything we publish is signed: clients pin this key and refuse what it did not sign.
        self.signer = load_or_create_signing_key(signing_key_file(config.broker, run_dir))
        self.blobs = BlobServer(transport, run=self.run_id, signer=self.signer, sender=COORDINATOR_ID, refused=self.counters.refused)
        self._events: deque = deque()
        self._outcome: RunOutcome | None = None
        self._retained: dict[str, bytes] = {}  # topic -> our latest retained payload on it
        self.assignments = self._load_assignments(run_dir)
        # Once a client's key is pinned, all it sends must be signed by it: a stranger can no
        # longer say hello (and evict it), go offline or ask for chunks in its name.
        self._client_keys = ClientKeys(run_dir, registry_client_keys(config.broker))
        if resume:
            resumed = load_run(run_dir)
            self.run_dir, self.state = resumed.run_dir, resumed.state
            if self.state.run_id != self.run_id:
                raise RunStateError(
                    f"{run_dir} holds run {self.state.run_id!r}, not {self.run_id!r}: pass the same --run-id or config"
                )
            self.global_state = self.run_dir.load_global(self.state.adapter_round)
            log.info("resumed run %s at round %d (%s)", self.run_id, self.state.round, self.state.phase.value)
        else:
            state = rounds.initial_state(config.rounds, run_id=self.run_id, seed=config.seed, now=clock())
            # The prepared packages are version 1; each re-alignment publishes the next one.
            state = dataclasses.replace(state, model_version=max(t.version for t in pipeline.tiers.values()))
            self.run_dir = RunDir.create(run_dir, state)
            self.state = state
            self.global_state = pipeline.initial_adapter()
            self.run_dir.save_global(0, self.global_state)

    @property
    def client_keys(self) -> dict[str, VerifyKey]:
        """Client id -> the key everything in its name must be signed by (:class:`ClientKeys`)."""
        return self._client_keys.keys

    def _decode(self, message: InboundMessage) -> tuple[topics.TopicInfo, Any]:
        """Decode a client's message, checked against its key (:meth:`ClientKeys.decode`)."""
        return self._client_keys.decode(message, run=self.run_id)

    @staticmethod
    def _load_assignments(run_dir: Path) -> dict[str, dict[str, Any]]:
        path = Path(run_dir) / ASSIGNMENTS_FILE
        return json.loads(path.read_text()) if path.is_file() else {}

    # ------------------------------------------------------------------ main loop

    def run(self, *, stop: Callable[[], bool] = lambda: False) -> RunOutcome:
        """Serve until the run finishes or fails (or ``stop()`` returns True).

        Args:
            stop: Polled every tick; True stops serving (the run stays resumable).

        Returns:
            The outcome.
        """
        self._subscribe()
        for tier in self.pipeline.tiers.values():
            self._publish_tier(tier)
        self._publish_adapter(self.state.adapter_round)
        self._post(Start(self.clock()))
        while self._outcome is None and not stop():
            self._drain()
            event = self.transport.poll(TICK_SECONDS)
            if isinstance(event, ConnectionEvent) and event.connected and not event.session_present and self.transport.reconnects:
                self._republish_retained()
            self._post(Tick(self.clock()))
        self._drain()
        self.transport.flush(timeout=30.0)
        if self._outcome is None:
            return RunOutcome("stopped", "stopped on request", self.run_dir.path, {})
        return self._outcome

    def _subscribe(self) -> None:
        handlers = {
            TopicKind.HELLO: self._on_hello,
            TopicKind.UPDATE: self._on_update,
            TopicKind.PRESENCE: self._on_presence,
            TopicKind.CHUNKREQ: self._on_chunk_request,
        }
        for kind, handler in handlers.items():
            self.transport.subscribe(topics.all_of(self.run_id, kind), self._guarded(kind, handler))

    def _guarded(self, kind: TopicKind, handler: Callable[[InboundMessage], None]) -> Callable[[InboundMessage], None]:
        """Wrap a handler so no single message can stop the loop."""

        def run_handler(message: InboundMessage) -> None:
            try:
                handler(message)
            except ProtocolError as exc:
                self._refuse(kind, message.topic, type(exc).__name__, str(exc))
                # The topic is all we can trust of a message that failed to decode: answer its
                # client, so a real one learns why (a version mismatch, say). Presence is a
                # client's Last Will: nobody listens for an answer to it.
                client = topics.client_of(message.topic)
                if client is not None and kind is not TopicKind.PRESENCE:
                    self._send_nack(client, -1, "", "bad_message", f"{type(exc).__name__}: {exc}")
            except FedSodaError as exc:
                self._refuse(kind, message.topic, type(exc).__name__, str(exc), level=logging.ERROR)
            except Exception:  # a bug one message triggers must not stop the coordinator
                self.counters.refused["internal_error"] += 1
                log.exception("refused %s on %s: [internal_error] handling it raised", kind, message.topic)

        return run_handler

    def _refuse(self, kind: str, topic: str, reason: str, detail: str, *, level: int = logging.WARNING) -> None:
        """Count and log one refused inbound message.

        Args:
            kind: What it was (topic kind).
            topic: Where it arrived.
            reason: The counter key: an error class name or a rejection code.
            detail: What exactly was wrong.
            level: Log level.
        """
        self.counters.refused[reason] += 1
        log.log(level, "refused %s on %s: [%s] %s", kind, topic, reason, detail)

    def _post(self, event: Any) -> None:
        self._events.append(event)
        self._drain()

    def _drain(self) -> None:
        while self._events and self._outcome is None:
            event = self._events.popleft()
            self.state, actions = rounds.step(self.state, event)
            for action in actions:
                self._carry_out(action)

    # ------------------------------------------------------------------ actions

    def _carry_out(self, action: Any) -> None:
        if isinstance(action, PersistCheckpoint):
            self.run_dir.save_state(self.state)
        elif isinstance(action, PublishSchedule):
            self._publish_schedule(action)
        elif isinstance(action, SendNack):
            self._send_nack(action.client_id, action.round, action.ref_message_id, action.code, action.reason)
        elif isinstance(action, RequestAggregation):
            self._aggregate(action.round, action.client_ids)
        elif isinstance(action, StartAlignment):
            self._realign(action.round)
        elif isinstance(action, Finish):
            self._finish(action.adapter_round)
        elif isinstance(action, Fail):
            self._write_report()
            self._outcome = RunOutcome("failed", action.reason, self.run_dir.path, {})
        else:  # pragma: no cover - the action union is closed
            raise RunStateError(f"unknown action {action!r}")

    def _publish(self, topic: str, msg_type: MessageType, body: Any, *, round_: int = -1, retain: bool = False) -> None:
        payload = codec.encode(msg_type, body, run=self.run_id, round=round_, sender=COORDINATOR_ID, signer=self.signer)
        self.transport.publish(topic, payload, qos=1, retain=retain)
        if retain:
            self._retained[topic] = payload

    def _republish_retained(self) -> None:
        """Publish our retained messages again: the broker lost our session, so maybe them too.

        A broker that crashed without saving (or an in-memory one) comes back without the
        manifests, schedule and adapter; a client that (re)joins after that would otherwise
        wait for them until the next round's.
        """
        log.warning("the broker lost our session: publishing the %d retained messages again", len(self._retained))
        for topic, payload in self._retained.items():
            self.transport.publish(topic, payload, qos=1, retain=True)

    def _publish_schedule(self, action: PublishSchedule) -> None:
        schedule = Schedule(
            round=action.round,
            status=action.status,
            deadline=action.deadline,
            quorum=action.quorum,
            participants=dict(action.participants),
            training=self._round_training(action.round),
            manifests={name: tier.manifest.blob_id for name, tier in self.pipeline.tiers.items()},
            adapter_round=action.adapter_round,
            task=self.task,
        )
        self._publish(topics.schedule(self.run_id), MessageType.SCHEDULE, schedule, round_=action.round, retain=True)
        if action.status == "running":
            # Our publish is queued in order before anything a client sends in reply, so
            # collecting may start now; late acknowledgements change nothing.
            self._events.append(PublishDone(action.round))

    def _round_training(self, round_: int) -> TrainingParams:
        """The round's training parameters, with DP-FedAvg's bound and noise when ``[privacy]`` is on."""
        training = self.pipeline.round_training(round_)
        privacy = self.config.privacy
        if not privacy.enabled:
            return training
        return dataclasses.replace(training, dp_clip_norm=privacy.clip_norm, dp_noise_multiplier=privacy.noise_multiplier)

    def _publish_tier(self, tier: TierLike) -> None:
        self.blobs.add(tier.manifest, tier.folder)
        self._publish(topics.manifest(self.run_id, tier.name), MessageType.MANIFEST, tier.manifest, retain=True)

    def _publish_adapter(self, adapter_round: int) -> None:
        body = GlobalAdapter(round=adapter_round, tensors=state_to_payloads(self.global_state))
        # Updates of the next round must name this adapter (RoundContext.base_digest).
        self._base_adapter = (adapter_round, payloads_digest(body.tensors))
        self._publish(topics.adapter(self.run_id), MessageType.GLOBAL_ADAPTER, body, round_=adapter_round, retain=True)

    def _send_nack(self, client_id: str, round_: int, ref: str, code: str, reason: str) -> None:
        log.warning("nack %s to %s (round %d): %s", code, client_id, round_, reason)
        body = Nack(client_id=client_id, round=round_, ref_message_id=ref, code=code, reason=reason)
        self._publish(topics.nack(self.run_id, client_id), MessageType.NACK, body, round_=round_)

    def _aggregate(self, round_: int, client_ids: tuple[str, ...]) -> None:
        wanted = set(client_ids)
        persisted = [u for u in self.run_dir.updates(round_) if u.client_id in wanted]
        self.global_state, influence = aggregate_round(
            self.strategy, self.global_state, persisted, self.influence_limits, uniform_weights=self.config.privacy.enabled
        )
        _fault_pause(f"aggregation:{round_}")
        # The factors first: an audit of a saved adapter always finds the factors it was made with.
        self.run_dir.save_influence(round_, influence)
        self.run_dir.save_global(round_, self.global_state)
        log.info("round %d aggregated from %d updates%s", round_, len(persisted), _bounded_note(influence))
        # Publish the adapter before AggregationDone lets the next round's schedule out, so a
        # client never waits on a schedule whose adapter has not been sent.
        self._publish_adapter(round_)
        self._evaluate_round(round_)
        self._events.append(AggregationDone(round_))

    def _evaluate_round(self, round_: int) -> None:
        """The per-round curve: the global adapter's metric every ``evaluation.every_rounds`` rounds."""
        settings = self.config.evaluation
        if settings.enabled and settings.every_rounds and round_ % settings.every_rounds == 0:
            self.run_dir.save_round_evaluation(self.pipeline.evaluate_round(self.global_state, round_))

    def _realign(self, round_: int) -> None:
        version = self.state.model_version + 1
        log.info("re-aligning sub-LLMs with the round-%d global adapter (version %d)", round_, version)
        for tier in self.pipeline.realign(self.global_state, version).values():
            self._publish_tier(tier)
        self._events.append(AlignmentDone(version))

    def _finish(self, adapter_round: int) -> None:
        results = self.pipeline.finish(self.run_dir.load_global(adapter_round), self.run_dir.path)
        if self.config.privacy.enabled:
            results["privacy"] = privacy_report(self.config.privacy, self.state.records)
            log.info("privacy budget: epsilon %.3g against the published adapters, %.3g against this coordinator (delta %g)",
                     results["privacy"]["epsilon_aggregate"], results["privacy"]["epsilon_coordinator"], self.config.privacy.delta)
        self._write_report(results)
        self._outcome = RunOutcome("finished", "", self.run_dir.path, results)

    def _write_report(self, results: dict[str, Any] | None = None) -> None:
        totals = ServingTotals(
            chunks_served=self.blobs.chunks_served,
            bytes_served=self.blobs.bytes_served,
            refused=dict(self.counters.refused),
            ignored=dict(self.counters.ignored),
            bytes_sent=self.transport.bytes_sent,
            bytes_received=self.transport.bytes_received,
        )
        tiers = {name: tier.describe() for name, tier in self.pipeline.tiers.items()}
        write_report(
            self.run_dir, self.state, method=self.config.method, aggregation=self.strategy.name,
            aggregation_settings={**dataclasses.asdict(self.config.aggregation), "uniform_weights": self.config.privacy.enabled}, task=dataclasses.asdict(self.task),
            assignments=self.assignments, tiers=tiers, totals=totals, results=results or {},
        )

    # ------------------------------------------------------------------ inbound

    def _on_hello(self, message: InboundMessage) -> None:
        # Before decoding: a flood of hellos (each may run the planner and write the run's
        # files) costs a token each. Refused ones get no answer; a real client says hello
        # again until it has an assignment.
        if not self._hellos.take():
            self._refuse(TopicKind.HELLO, message.topic, "hello_rate", "more hellos a second than validation.hellos_per_second", level=logging.DEBUG)
            return
        info, envelope = self._decode(message)
        hello: Hello = envelope.body
        check_hello(hello, info.client, max_examples=self.config.validation.max_examples)
        too_old = client_too_old(envelope.version)
        if too_old is not None:
            assignment = Assignment(client_id=hello.client_id, accepted=False, tier="", reason=too_old, plan={})
        else:
            assignment = self.pipeline.assign(hello.client_id, hello.profile)
        self.assignments[hello.client_id] = {"accepted": assignment.accepted, "tier": assignment.tier, "reason": assignment.reason, **assignment.plan}
        (self.run_dir.path / ASSIGNMENTS_FILE).write_text(json.dumps(self.assignments, indent=2, default=str))
        self._client_keys.pin(hello, assignment.accepted)
        log.info(
            "hello from %s (%s): %s",
            hello.client_id,
            hello.profile.device_class,
            f"tier {assignment.tier}" if assignment.accepted else f"refused: {assignment.reason}",
        )
        # Checkpoint the client before answering: a client only stops saying hello once it
        # has an assignment, so a crash in between must leave it unanswered, not forgotten.
        self._post(ClientHello(hello.client_id, assignment.tier, assignment.accepted, hello.num_examples))
        self._publish(topics.assign(self.run_id, hello.client_id), MessageType.ASSIGNMENT, assignment)

    def _on_presence(self, message: InboundMessage) -> None:
        info, envelope = self._decode(message)
        presence: Presence = envelope.body
        if presence.client_id != info.client:
            raise TopicError(f"presence on {message.topic} names another client {short_repr(presence.client_id)}")
        log.info("%s is %s (%s)", info.client, "online" if presence.online else "offline", presence.reason)
        self._post(ClientOnline(info.client) if presence.online else ClientOffline(info.client))

    def _on_chunk_request(self, message: InboundMessage) -> None:
        info, envelope = self._decode(message)
        assert info.client is not None  # chunkreq topics are per-client
        client = self.state.client(info.client)
        refusal = check_chunk_request(client, info.client)
        if refusal is not None:
            self._refuse(TopicKind.CHUNKREQ, message.topic, refusal.code, refusal.detail)
            self._send_nack(info.client, envelope.round, envelope.message_id, refusal.code, refusal.advice)
            return
        assert client is not None  # check_chunk_request refuses a client that never said hello
        # Its own tier's packages only: the byte budget then bounds what one client can pull.
        self.blobs.serve(info.client, envelope.body, ref_message_id=envelope.message_id, round=envelope.round, tier=client.tier)

    def _on_update(self, message: InboundMessage) -> None:
        info, envelope = self._decode(message)
        client_id = info.client
        update = envelope.body
        # The sender is the topic's client (decode_message); it must also be assigned to the
        # round it names, and that round must be open.
        verdict = rounds.admission(self.state, client_id, update.round)
        if not verdict.accepted:
            if verdict.verdict == "duplicate":  # a QoS 1 repeat: nothing wrong with it
                self.counters.ignored["duplicate_update"] += 1
            else:
                self._refuse(TopicKind.UPDATE, message.topic, verdict.verdict, verdict.reason)
            # The state machine counts it in the round record and answers (a duplicate silently).
            self._post(UpdateReceived(client_id, update.round, envelope.message_id, update.num_examples, ok=False, code=verdict.verdict, reason=verdict.reason))
            return
        try:
            valid = validate_update(envelope, topic_client_id=client_id, context=self._round_context())
        except UpdateValidationError as exc:
            self._refuse(TopicKind.UPDATE, message.topic, exc.code, exc.reason)
            self._post(UpdateReceived(client_id, update.round, envelope.message_id, update.num_examples, ok=False, code=exc.code, reason=exc.reason))
            return
        self.run_dir.save_update(
            update.round,
            client_id,
            valid.delta,
            num_examples=update.num_examples,
            norms=(valid.norm, valid.key_norms),
            message_id=envelope.message_id,
            metrics=dict(update.metrics),
            resources=dataclasses.asdict(update.resources),
        )
        log.info("round %d: accepted update from %s (%d examples)", update.round, client_id, update.num_examples)
        self._post(UpdateReceived(client_id, update.round, envelope.message_id, update.num_examples))

    def _round_context(self) -> RoundContext:
        rec = self.state.current
        participants = dict(rec.participants) if rec is not None else {}
        return RoundContext(
            run_id=self.run_id,
            round=self.state.round,
            participants=participants,
            expected_shapes=self.pipeline.expected_shapes(self.state.round),
            declared_examples={
                cid: client.num_examples for cid in participants if (client := self.state.client(cid)) is not None
            },
            base_round=self._base_adapter[0],
            base_digest=self._base_adapter[1],
            limits=UpdateLimits(
                max_norm=self.config.validation.max_delta_norm,
                max_examples=self.config.validation.max_examples,
                **self._dp_limits(len(participants)),
            ),
        )

    def _dp_limits(self, participants: int) -> dict[str, float]:
        """DP-FedAvg's bound and each client's noise for a round of ``participants`` clients ({} without DP)."""
        privacy = self.config.privacy
        if not privacy.enabled:
            return {}
        return {"dp_clip_norm": privacy.clip_norm,
                "dp_noise_std": dp_noise_std(privacy.clip_norm, privacy.noise_multiplier, participants)}
