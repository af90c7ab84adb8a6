"""The coordinator's round loop as a pure state machine.

``step(state, event) -> (state, actions)`` is the whole round logic: which clients train,
when a round closes, when to aggregate, re-align, finish or fail. It performs no I/O and
reads no clock: time enters only as :class:`~coordinator.run.round_events.Tick` events, so
tests drive deadlines without sleeping and a restarted coordinator replays nothing but its
checkpoint. The server loop (``coordinator.run.server``) turns broker messages into events
and carries out the returned actions (publish, nack, aggregate, persist) in order.

Here are the machine's functions (:func:`initial_state`, :func:`admission`, :func:`step` and
its handlers); its data is in :mod:`coordinator.run.round_state` (phases, the transition
table, state records) and :mod:`coordinator.run.round_events` (events in, actions out).

Phases and their allowed changes are data
(:data:`~coordinator.run.round_state.TRANSITIONS`); ``step`` raises
:class:`~shared.errors.RunStateError` on any phase change the table does not list. Staying
in the same phase is not a transition.

Update admission (late, duplicate, not assigned) is decided here by :func:`admission`, the
same function ``step`` uses, so the server can ask before it validates and persists an
update's tensors; content validation (shapes, NaN, norm) happens outside
(``coordinator.run.inbound``) and enters as ``UpdateReceived(ok=False, code=..., reason=...)``.

Somewhat over the project's ~450 lines on purpose: ``step`` and the handler of each event
are one unit, read against the transition table they must obey.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from coordinator.run.round_events import (
    Abort,
    Action,
    AggregationDone,
    AlignmentDone,
    ClientHello,
    ClientOffline,
    ClientOnline,
    Event,
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
from coordinator.run.round_state import (
    TERMINAL_PHASES,
    TRANSITIONS,
    ClientRecord,
    Phase,
    RoundRecord,
    RoundState,
)
from coordinator.settings import RoundConfig
from shared.errors import RunStateError

logger = logging.getLogger(__name__)

# The status string a published Schedule carries in each phase (shared.protocol.Schedule).
_SCHEDULE_STATUS: dict[Phase, str] = {
    Phase.WAITING: "waiting",
    Phase.PUBLISHING: "running",
    Phase.COLLECTING: "running",
    Phase.AGGREGATING: "running",
    Phase.ALIGNING: "aligning",
    Phase.FINISHED: "finished",
    Phase.FAILED: "failed",
}


def initial_state(config: RoundConfig, *, run_id: str, seed: int, now: float = 0.0) -> RoundState:
    """The state of a new run: waiting for clients, round 0, initial adapter.

    Args:
        config: Round config.
        run_id: The run's id.
        seed: Selection seed.
        now: Start time (unix seconds).

    Returns:
        A fresh state. Feed ``Start(now)`` to it to get the first actions.
    """
    return RoundState(config=config, run_id=run_id, seed=seed, now=now, waiting_since=now)


# --------------------------------------------------------------------------- admission


@dataclass(frozen=True)
class Admission:
    """Whether the round loop would take an update, before looking at its tensors.

    Attributes:
        verdict: ``"accept"``, ``"duplicate"`` (already counted; ignore silently),
            ``"late"`` (round closed), ``"not_assigned"`` or ``"round"`` (a round that
            has not started).
        reason: Human-readable explanation ("" on accept).
    """

    verdict: str
    reason: str = ""

    @property
    def accepted(self) -> bool:
        """True when the update may be validated, persisted and counted."""
        return self.verdict == "accept"


def admission(state: RoundState, client_id: str, round_: int) -> Admission:
    """Decide whether an update from ``client_id`` for ``round_`` can still count.

    The server calls this before validating and persisting an update; ``step`` applies the
    same rule, so both always agree.

    Args:
        state: Current state.
        client_id: Sender.
        round_: Round the update names.

    Returns:
        The verdict.
    """
    rec = state.record(round_)
    if rec is None:
        if round_ > state.round:
            return Admission("round", f"round {round_} has not started (current round {state.round})")
        return Admission("late", f"round {round_} is over (current round {state.round})")
    if client_id in rec.reported:
        return Admission("duplicate", f"update of {client_id} for round {round_} already counted")
    if client_id not in rec.assigned:
        return Admission("not_assigned", f"{client_id} is not assigned to round {round_}")
    # PUBLISHING too: the broker may deliver the schedule before it acknowledges our publish.
    if round_ != state.round or state.phase not in (Phase.PUBLISHING, Phase.COLLECTING):
        return Admission("late", f"round {round_} closed before the update arrived")
    return Admission("accept")


# --------------------------------------------------------------------------- step


def step(state: RoundState, event: Event) -> tuple[RoundState, list[Action]]:
    """Apply one event.

    Args:
        state: Current state.
        event: What happened.

    Returns:
        The new state and the actions to carry out in order. ``PersistCheckpoint`` comes
        first whenever anything but the clock changed, so a crash after it replays the
        remaining actions from the checkpoint (see :class:`Start`).

    Raises:
        RunStateError: The event would cause a phase change not in :data:`TRANSITIONS`.
        TypeError: ``event`` is not an event.
    """
    handler = _HANDLERS.get(type(event))
    if handler is None:
        raise TypeError(f"not a round event: {event!r}")
    new, actions = handler(state, event)
    if new.phase is not state.phase:
        if (state.phase, new.phase) not in TRANSITIONS:
            raise RunStateError(
                f"phase change {state.phase.value} -> {new.phase.value} on "
                f"{type(event).__name__} is not in the transition table"
            )
        # Entering a phase emits what that phase waits on; handlers only pick the phase.
        new, entry_actions = _enter(new)
        actions = actions + entry_actions
    if replace(new, now=state.now) != state:
        actions = [PersistCheckpoint(), *actions]
    return new, actions


def _enter(new: RoundState) -> tuple[RoundState, list[Action]]:
    if new.phase is Phase.FAILED:
        logger.warning("run %s failed: %s", new.run_id, new.fail_reason)
        return new, [_schedule(new), Fail(new.fail_reason)]
    if new.phase is Phase.FINISHED:
        return new, [_schedule(new), Finish(new.adapter_round)]
    if new.phase is Phase.WAITING:
        new = replace(new, waiting_since=new.now)
        return new, [_schedule(new)]
    if new.phase is Phase.PUBLISHING:
        new = _select_round(new)
        return new, [_schedule(new)]
    if new.phase is Phase.AGGREGATING:
        return new, [RequestAggregation(new.round, _current(new).reported)]
    if new.phase is Phase.ALIGNING:
        return new, [_schedule(new), StartAlignment(new.round)]
    return new, []  # COLLECTING: the schedule is already out


def _schedule(state: RoundState) -> PublishSchedule:
    rec = state.current
    running = state.phase in (Phase.PUBLISHING, Phase.COLLECTING, Phase.AGGREGATING)
    if running and rec is not None:
        return PublishSchedule(
            round=rec.round,
            status=_SCHEDULE_STATUS[state.phase],
            deadline=rec.deadline,
            quorum=rec.quorum,
            participants=rec.participants,
            adapter_round=state.adapter_round,
            model_version=state.model_version,
        )
    upcoming = state.round + 1 if state.phase in (Phase.WAITING, Phase.ALIGNING) else state.round
    return PublishSchedule(
        round=upcoming,
        status=_SCHEDULE_STATUS[state.phase],
        deadline=0.0,
        quorum=0,
        participants=(),
        adapter_round=state.adapter_round,
        model_version=state.model_version,
    )


def _current(state: RoundState) -> RoundRecord:
    rec = state.current
    if rec is None:
        raise RunStateError(f"phase {state.phase.value} but round {state.round} has no record")
    return rec


def _with_record(state: RoundState, rec: RoundRecord) -> RoundState:
    records = tuple(rec if r.round == rec.round else r for r in state.records)
    return replace(state, records=records)


def _select_round(state: RoundState) -> RoundState:
    round_ = state.round + 1
    eligible = state.eligible_online()  # sorted, so selection depends only on the seed
    k = state.config.selection_size(len(eligible))
    chosen = sorted(random.Random(f"{state.seed}:{round_}").sample(eligible, k))
    tiers = {c.client_id: c.tier for c in state.clients}
    rec = RoundRecord(
        round=round_,
        participants=tuple((cid, tiers[cid]) for cid in chosen),
        quorum=state.config.quorum_for(k),
        started_at=state.now,
        deadline=state.now + state.config.round_timeout_s,
    )
    logger.info("round %d: selected %d of %d eligible clients", round_, k, len(eligible))
    return replace(state, round=round_, records=(*state.records, rec))


def _enough_clients(state: RoundState) -> bool:
    return len(state.eligible_online()) >= state.config.min_clients


def _next_phase_after_round(state: RoundState) -> Phase:
    return Phase.PUBLISHING if _enough_clients(state) else Phase.WAITING


def _maybe_close(state: RoundState) -> RoundState:
    """Close the collecting round when every awaited assigned client reported and quorum is met
    (a client that missed ``max_missed`` rounds in a row is not waited for, see ``awaited``)."""
    if state.phase is not Phase.COLLECTING:
        return state
    rec = _current(state)
    pending_live = (rec.assigned & state.awaited()) - set(rec.reported)
    if len(rec.reported) >= rec.quorum and not pending_live:
        return _close(state, rec)
    return state


def _close(state: RoundState, rec: RoundRecord) -> RoundState:
    rec = replace(
        rec,
        closed_at=state.now,
        dropouts=len(rec.assigned - set(rec.reported)),
        outcome="closed",
    )
    return replace(_count_missed(_with_record(state, rec), rec), phase=Phase.AGGREGATING)


def _count_missed(state: RoundState, rec: RoundRecord) -> RoundState:
    """A closed round's participants: a report clears a client's missed count; no report from
    a client still online adds one. One that went offline kept the round from waiting on it
    (its Last Will), so it is not counted: it is selectable again once it is back online."""
    reported = set(rec.reported)

    def counted(c: ClientRecord) -> ClientRecord:
        if c.client_id not in rec.assigned:
            return c
        if c.client_id in reported:
            return replace(c, missed=0)
        return replace(c, missed=c.missed + 1) if c.online else c

    clients = tuple(counted(c) for c in state.clients)
    left_out = [c.client_id for c in clients if state.config.max_missed and c.missed == state.config.max_missed]
    if left_out:
        logger.info("round %d: rounds no longer wait for %s until they show life (missed %d round(s) in a row)",
                    rec.round, ", ".join(left_out), state.config.max_missed)
    return replace(state, clients=clients)


def _fail(state: RoundState, reason: str) -> RoundState:
    rec = state.current
    if rec is not None and rec.outcome in ("open", "closed"):
        state = _with_record(
            state,
            replace(
                rec,
                outcome="failed",
                closed_at=rec.closed_at if rec.closed_at is not None else state.now,
                dropouts=len(rec.assigned - set(rec.reported)),
            ),
        )
    return replace(state, phase=Phase.FAILED, fail_reason=reason)


def _set_client(state: RoundState, client: ClientRecord) -> RoundState:
    others = [c for c in state.clients if c.client_id != client.client_id]
    return replace(state, clients=tuple(sorted([*others, client], key=lambda c: c.client_id)))


def _try_start(state: RoundState) -> RoundState:
    if state.phase is Phase.WAITING and _enough_clients(state):
        return replace(state, phase=Phase.PUBLISHING)
    return state


# --------------------------------------------------------------------------- handlers


def _on_start(state: RoundState, event: Start) -> tuple[RoundState, list[Action]]:
    state = replace(state, now=event.now)
    if state.phase is Phase.WAITING and _enough_clients(state):
        return replace(state, phase=Phase.PUBLISHING), []
    if state.phase is Phase.COLLECTING:
        closed = _maybe_close(state)  # a resumed round may already hold every report
        if closed.phase is not state.phase:
            return closed, []
    return state, _pending_actions(state)


def _pending_actions(state: RoundState) -> list[Action]:
    """What a phase waits on, re-emitted after a restart (all of it is idempotent)."""
    if state.phase is Phase.AGGREGATING:
        return [RequestAggregation(state.round, _current(state).reported)]
    actions: list[Action] = [_schedule(state)]
    if state.phase is Phase.ALIGNING:
        actions.append(StartAlignment(state.round))
    elif state.phase is Phase.FINISHED:
        actions.append(Finish(state.adapter_round))
    elif state.phase is Phase.FAILED:
        actions.append(Fail(state.fail_reason))
    return actions


def _on_tick(state: RoundState, event: Tick) -> tuple[RoundState, list[Action]]:
    state = replace(state, now=event.now)
    cfg = state.config
    if state.phase is Phase.WAITING:
        state = _try_start(state)
        if (
            state.phase is Phase.WAITING
            and cfg.max_wait_s is not None
            and event.now - state.waiting_since >= cfg.max_wait_s
        ):
            n = len(state.eligible_online())
            return _fail(
                state,
                f"only {n} of min_clients={cfg.min_clients} eligible clients online after "
                f"{cfg.max_wait_s:g} s: start more clients or lower min_clients",
            ), []
        return state, []
    if state.phase is not Phase.COLLECTING:
        return state, []
    rec = _current(state)
    if event.now < rec.deadline:
        return state, []
    if len(rec.reported) >= rec.quorum:
        return _close(state, rec), []
    if cfg.on_deadline_without_quorum == "extend" and rec.extensions < cfg.max_extensions:
        rec = replace(
            rec,
            extensions=rec.extensions + 1,
            deadline=max(rec.deadline, event.now) + cfg.round_timeout_s,
        )
        logger.info(
            "round %d: %d of %d reports at the deadline; extension %d of %d",
            rec.round, len(rec.reported), rec.quorum, rec.extensions, cfg.max_extensions,
        )
        state = _with_record(state, rec)
        return state, [_schedule(state)]
    why = (
        f"no extension left ({cfg.max_extensions} used)"
        if cfg.on_deadline_without_quorum == "extend"
        else "on_deadline_without_quorum = 'fail'"
    )
    return _fail(
        state,
        f"round {rec.round} reached its deadline with {len(rec.reported)} of quorum "
        f"{rec.quorum} reports and {why}",
    ), []


def _on_hello(state: RoundState, event: ClientHello) -> tuple[RoundState, list[Action]]:
    client = ClientRecord(
        client_id=event.client_id,
        tier=event.tier,
        accepted=event.accepted,
        num_examples=event.num_examples,
        online=True,
    )
    state = _set_client(state, client)
    return _maybe_close(_try_start(state)), []


def _on_presence(state: RoundState, client_id: str, online: bool) -> tuple[RoundState, list[Action]]:
    client = state.client(client_id)
    if client is None:
        # Presence can precede hello (retained messages); hello will register the client.
        return state, []
    state = _set_client(state, replace(client, online=online))
    return _maybe_close(_try_start(state)), []


def _on_online(state: RoundState, event: ClientOnline) -> tuple[RoundState, list[Action]]:
    return _on_presence(state, event.client_id, True)


def _on_offline(state: RoundState, event: ClientOffline) -> tuple[RoundState, list[Action]]:
    return _on_presence(state, event.client_id, False)


def _on_update(state: RoundState, event: UpdateReceived) -> tuple[RoundState, list[Action]]:
    verdict = admission(state, event.client_id, event.round)
    rec = state.record(event.round) or state.current

    def bump(field_name: str) -> RoundState:
        if rec is None:
            return state
        return _with_record(state, replace(rec, **{field_name: getattr(rec, field_name) + 1}))

    def nack(code: str, reason: str) -> SendNack:
        return SendNack(event.client_id, event.round, event.message_id, code, reason)

    if verdict.verdict == "duplicate":
        logger.info("ignoring duplicate update: %s", verdict.reason)
        return bump("duplicates"), []
    if verdict.verdict == "late":
        # Late is still alive: it counts as life, so the client is selectable again.
        late = bump("late")
        client = late.client(event.client_id)
        if client is not None and client.missed:
            late = _set_client(late, replace(client, missed=0))
        return late, [nack("late", verdict.reason)]
    if verdict.verdict in ("not_assigned", "round"):
        return bump("rejected"), [nack(verdict.verdict, verdict.reason)]
    if not event.ok:
        return bump("rejected"), [nack(event.code or "rejected", event.reason)]
    assert rec is not None  # accept implies the current round's record exists
    rec = replace(
        rec,
        reported=tuple(sorted((*rec.reported, event.client_id))),
        examples=rec.examples + event.num_examples,
    )
    return _maybe_close(_with_record(state, rec)), []


def _on_publish_done(state: RoundState, event: PublishDone) -> tuple[RoundState, list[Action]]:
    if state.phase is Phase.PUBLISHING and event.round == state.round:
        # A resumed round may already hold every report (persisted before the crash).
        return _maybe_close(replace(state, phase=Phase.COLLECTING)), []
    return state, []  # an acknowledgement of a status-only or stale schedule


def _on_aggregation_done(state: RoundState, event: AggregationDone) -> tuple[RoundState, list[Action]]:
    if state.phase is not Phase.AGGREGATING or event.round != state.round:
        logger.warning("ignoring AggregationDone(%d) in %s round %d", event.round, state.phase, state.round)
        return state, []
    state = replace(state, adapter_round=event.round)
    state = _with_record(state, replace(_current(state), outcome="aggregated"))
    cfg = state.config
    if state.round >= cfg.rounds:
        return replace(state, phase=Phase.FINISHED), []
    if cfg.realign_every and state.round % cfg.realign_every == 0:
        return replace(state, phase=Phase.ALIGNING), []
    return replace(state, phase=_next_phase_after_round(state)), []


def _on_alignment_done(state: RoundState, event: AlignmentDone) -> tuple[RoundState, list[Action]]:
    if state.phase is not Phase.ALIGNING:
        logger.warning("ignoring AlignmentDone(%d) in %s", event.version, state.phase)
        return state, []
    state = replace(state, model_version=event.version)
    return replace(state, phase=_next_phase_after_round(state)), []


def _on_abort(state: RoundState, event: Abort) -> tuple[RoundState, list[Action]]:
    if state.phase in TERMINAL_PHASES:
        return state, []
    return _fail(state, event.reason), []


_HANDLERS: dict[type, Callable[[RoundState, Any], tuple[RoundState, list[Action]]]] = {
    Start: _on_start,
    Tick: _on_tick,
    ClientHello: _on_hello,
    ClientOnline: _on_online,
    ClientOffline: _on_offline,
    UpdateReceived: _on_update,
    PublishDone: _on_publish_done,
    AggregationDone: _on_aggregation_done,
    AlignmentDone: _on_alignment_done,
    Abort: _on_abort,
}
