"""The pure round state machine, driven by injected events and ticks (no sleeping, no clock).

Every scenario runs through a :class:`Driver` that records each phase change and checks the
state survives a JSON round trip after every step. Scenarios are registered, and
``test_every_transition_in_the_table_is_exercised`` replays them all and fails if a
transition of ``TRANSITIONS`` was never taken.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import replace

import pytest

from coordinator.run import rounds
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
from coordinator.run.round_state import TRANSITIONS, Phase, RoundState
from coordinator.run.rounds import admission, initial_state, step
from coordinator.settings import RoundConfig
from shared.errors import ConfigError, RunStateError

T0 = 1_000.0
TIMEOUT = 60.0


class Driver:
    """Applies events, recording phase changes and checking the JSON round trip."""

    def __init__(self) -> None:
        self.seen: set[tuple[Phase, Phase]] = set()

    def run(self, state: RoundState, *events: Event) -> tuple[RoundState, list[Action]]:
        out: list[Action] = []
        for ev in events:
            new, actions = step(state, ev)
            if new.phase is not state.phase:
                self.seen.add((state.phase, new.phase))
            assert RoundState.from_dict(json.loads(json.dumps(new.to_dict()))) == new
            state = new
            out.extend(actions)
        return state, out


_SCENARIOS: list[Callable[[Driver], None]] = []


def scenario(fn: Callable[[Driver], None]) -> Callable[[Driver], None]:
    _SCENARIOS.append(fn)
    return fn


@pytest.fixture
def d() -> Driver:
    return Driver()


def cfg(**kw: object) -> RoundConfig:
    base: dict[str, object] = {"rounds": 2, "min_clients": 2, "round_timeout_s": TIMEOUT}
    base.update(kw)
    return RoundConfig(**base)  # type: ignore[arg-type]


def hello(cid: str, tier: str = "small", accepted: bool = True, n: int = 10) -> ClientHello:
    return ClientHello(client_id=cid, tier=tier, accepted=accepted, num_examples=n)


def upd(cid: str, round_: int = 1, n: int = 10, mid: str | None = None, **kw: object) -> UpdateReceived:
    return UpdateReceived(cid, round_, mid or f"{cid}-{round_}", n, **kw)  # type: ignore[arg-type]


def collecting(d: Driver, config: RoundConfig, clients: tuple[str, ...] = ("a", "b", "c")) -> RoundState:
    """A run whose first round is published and collecting, every client eligible at start."""
    config = replace(config, min_clients=len(clients))
    s = initial_state(config, run_id="run1", seed=7, now=T0)
    s, _ = d.run(s, Start(T0), *(hello(c) for c in clients))
    assert s.phase is Phase.PUBLISHING
    s, _ = d.run(s, PublishDone(s.round))
    assert s.phase is Phase.COLLECTING
    return s


def of(actions: list[Action], kind: type) -> list:
    return [a for a in actions if isinstance(a, kind)]


# ------------------------------------------------------------------ config


def test_config_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        RoundConfig(rounds=0, min_clients=1, quorum=3, client_fraction=0.0, round_timeout_s=0)
    msg = str(err.value)
    for fragment in ("rounds", "quorum (3) exceeds min_clients", "client_fraction", "round_timeout_s"):
        assert fragment in msg
    with pytest.raises(ConfigError, match="on_deadline_without_quorum"):
        RoundConfig(rounds=1, on_deadline_without_quorum="retry")  # type: ignore[arg-type]


def test_selection_size_and_quorum() -> None:
    assert RoundConfig(rounds=1, clients_per_round=3).selection_size(10) == 3
    assert RoundConfig(rounds=1, clients_per_round=3).selection_size(2) == 2
    assert RoundConfig(rounds=1, client_fraction=0.25, min_clients=2).selection_size(10) == 3
    assert RoundConfig(rounds=1, client_fraction=0.1, min_clients=2).selection_size(10) == 2
    assert RoundConfig(rounds=1, quorum_fraction=0.5).quorum_for(5) == 3
    assert RoundConfig(rounds=1, quorum=2, min_clients=2).quorum_for(4) == 2


# ------------------------------------------------------------------ starting


@scenario
def test_waits_for_min_eligible_clients_then_publishes(d: Driver) -> None:
    s = initial_state(cfg(min_clients=2), run_id="run1", seed=1, now=T0)
    s, acts = d.run(s, Start(T0))
    assert s.phase is Phase.WAITING
    assert acts == [PublishSchedule(1, "waiting", 0.0, 0, (), 0, 0)]
    s, acts = d.run(s, hello("a"), hello("r", tier="", accepted=False), Tick(T0 + 5))
    assert s.phase is Phase.WAITING, "a refused client does not count towards min_clients"
    s, acts = d.run(s, hello("b", tier="big"))
    assert s.phase is Phase.PUBLISHING
    assert acts[0] == PersistCheckpoint()
    (sched,) = of(acts, PublishSchedule)
    assert sched.status == "running" and sched.round == 1
    assert sched.participants == (("a", "small"), ("b", "big"))
    assert sched.deadline == T0 + 5 + TIMEOUT, "deadline counts from the last tick"
    s, acts = d.run(s, PublishDone(1))
    assert s.phase is Phase.COLLECTING


@scenario
def test_max_wait_without_enough_clients_fails(d: Driver) -> None:
    s = initial_state(cfg(min_clients=3, max_wait_s=100.0), run_id="run1", seed=1, now=T0)
    s, _ = d.run(s, Start(T0), hello("a"), Tick(T0 + 99))
    assert s.phase is Phase.WAITING
    s, acts = d.run(s, Tick(T0 + 100))
    assert s.phase is Phase.FAILED
    assert "only 1 of min_clients=3" in s.fail_reason
    assert of(acts, Fail) == [Fail(s.fail_reason)]
    assert of(acts, PublishSchedule)[0].status == "failed"


def test_selection_is_deterministic_and_only_online_accepted(d: Driver) -> None:
    config = cfg(min_clients=11, clients_per_round=3, quorum=1)
    others = [f"c{i:02d}" for i in range(12) if i != 3]

    def select(seed: int, order: list[str]) -> frozenset[str]:
        s = initial_state(config, run_id="run1", seed=seed, now=T0)
        s, _ = d.run(s, hello("refused", accepted=False), hello("c03"), ClientOffline("c03"))
        s, _ = d.run(s, *(hello(c) for c in order))
        assert s.phase is Phase.PUBLISHING
        return s.current.assigned

    chosen = select(7, others)
    assert len(chosen) == 3 and chosen <= set(others)
    assert select(7, others[::-1]) == chosen, "hello order must not change the selection"
    assert len({select(k, others) for k in range(20)}) > 1, "the seed must matter"


# ------------------------------------------------------------------ closing


@scenario
def test_round_closes_when_every_live_assigned_client_reported(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=0.5))
    assert s.current.assigned == {"a", "b", "c"} and s.current.quorum == 2
    s, acts = d.run(s, upd("a"), upd("b"))
    assert s.phase is Phase.COLLECTING, "quorum met but c is live and has not reported"
    s, acts = d.run(s, upd("c", n=5))
    assert s.phase is Phase.AGGREGATING
    assert acts == [PersistCheckpoint(), RequestAggregation(1, ("a", "b", "c"))]
    rec = s.current
    assert (rec.examples, rec.dropouts, rec.outcome) == (25, 0, "closed")


@scenario
def test_deadline_with_quorum_closes_without_the_slow_client(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=0.5))
    deadline = s.current.deadline
    s, _ = d.run(s, upd("a"), upd("b"), Tick(deadline - 0.001))
    assert s.phase is Phase.COLLECTING
    s, acts = d.run(s, Tick(deadline))
    assert s.phase is Phase.AGGREGATING
    assert of(acts, RequestAggregation) == [RequestAggregation(1, ("a", "b"))]
    assert s.current.dropouts == 1 and s.current.closed_at == deadline


@scenario
def test_deadline_without_quorum_extends_then_closes(d: Driver) -> None:
    s = collecting(d, cfg(quorum=2, on_deadline_without_quorum="extend", max_extensions=2))
    deadline = s.current.deadline
    s, acts = d.run(s, upd("a"), Tick(deadline + 3))
    assert s.phase is Phase.COLLECTING
    assert s.current.extensions == 1
    assert s.current.deadline == deadline + 3 + TIMEOUT
    (sched,) = of(acts, PublishSchedule)
    assert sched.deadline == s.current.deadline and sched.status == "running"
    s, acts = d.run(s, Tick(deadline + 10), upd("b"), Tick(s.current.deadline))
    assert s.phase is Phase.AGGREGATING
    assert s.current.reported == ("a", "b")


@scenario
def test_deadline_without_quorum_fails_when_extensions_run_out(d: Driver) -> None:
    s = collecting(d, cfg(quorum=2, max_extensions=1))
    s, _ = d.run(s, upd("a"), Tick(s.current.deadline))
    assert s.current.extensions == 1
    s, acts = d.run(s, Tick(s.current.deadline))
    assert s.phase is Phase.FAILED
    assert "no extension left" in s.fail_reason and "1 of quorum 2" in s.fail_reason
    assert s.current.outcome == "failed" and s.current.dropouts == 2
    assert of(acts, Fail) and of(acts, PublishSchedule)[0].status == "failed"


@scenario
def test_deadline_without_quorum_fails_at_once_with_fail_policy(d: Driver) -> None:
    s = collecting(d, cfg(quorum=2, on_deadline_without_quorum="fail"))
    s, acts = d.run(s, Tick(s.current.deadline))
    assert s.phase is Phase.FAILED
    assert "on_deadline_without_quorum = 'fail'" in s.fail_reason
    assert s.current.extensions == 0


@scenario
def test_offline_client_no_longer_blocks_closing(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=0.5))
    s, _ = d.run(s, upd("a"), upd("b"))
    assert s.phase is Phase.COLLECTING
    s, acts = d.run(s, ClientOffline("c"))  # c's Last Will
    assert s.phase is Phase.AGGREGATING
    assert of(acts, RequestAggregation) == [RequestAggregation(1, ("a", "b"))]
    assert s.current.dropouts == 1


@scenario
def test_update_racing_ahead_of_publish_done_counts(d: Driver) -> None:
    s = initial_state(cfg(min_clients=2, quorum=1), run_id="run1", seed=1, now=T0)
    s, _ = d.run(s, hello("a"), hello("b"))
    assert s.phase is Phase.PUBLISHING
    s, acts = d.run(s, upd("a"), upd("b"))
    assert of(acts, SendNack) == [] and s.phase is Phase.PUBLISHING
    s, acts = d.run(s, PublishDone(1))
    assert s.phase is Phase.AGGREGATING
    assert of(acts, RequestAggregation) == [RequestAggregation(1, ("a", "b"))]


def test_offline_before_quorum_does_not_close(d: Driver) -> None:
    s = collecting(d, cfg(quorum=2))
    s, _ = d.run(s, upd("a"), ClientOffline("b"), ClientOffline("c"))
    assert s.phase is Phase.COLLECTING
    assert admission(s, "b", 1).accepted, "an offline assigned client may still report"
    s, _ = d.run(s, upd("b"))
    assert s.phase is Phase.AGGREGATING


@scenario
def test_client_coming_back_is_live_again_and_may_report(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=0.5))
    s, _ = d.run(s, upd("a"), ClientOffline("c"), ClientOnline("c"), upd("b"))
    assert s.phase is Phase.COLLECTING, "c is back online, so the round waits for it"
    s, _ = d.run(s, upd("c"))
    assert s.phase is Phase.AGGREGATING
    assert s.current.reported == ("a", "b", "c") and s.current.dropouts == 0


def test_presence_of_unknown_client_is_ignored(d: Driver) -> None:
    s = collecting(d, cfg())
    s2, acts = d.run(s, ClientOnline("stranger"), ClientOffline("stranger"))
    assert s2 == s and acts == []


# ------------------------------------------------------------------ admission


@scenario
def test_late_updates_are_nacked_and_counted_on_their_round(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=0.5, rounds=3))
    s, _ = d.run(s, upd("a"), upd("b"), Tick(s.current.deadline))
    assert s.phase is Phase.AGGREGATING
    s, acts = d.run(s, upd("c", mid="m-late"))
    assert acts == [
        PersistCheckpoint(),
        SendNack("c", 1, "m-late", "late", "round 1 closed before the update arrived"),
    ]
    s, _ = d.run(s, AggregationDone(1), PublishDone(2))
    assert s.phase is Phase.COLLECTING and s.round == 2
    s, acts = d.run(s, upd("c", round_=1, mid="m-later"))
    assert of(acts, SendNack)[0].code == "late"
    assert s.record(1).late == 2 and s.record(2).late == 0
    s, acts = d.run(s, upd("c", round_=0, mid="m0"))
    assert of(acts, SendNack)[0].code == "late"


@scenario
def test_duplicates_are_ignored_and_counted_without_nack(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=1.0, rounds=1))
    s, acts = d.run(s, upd("a"), upd("a"), upd("a", mid="resent-with-new-id"))
    assert of(acts, SendNack) == []
    assert s.current.reported == ("a",) and s.current.duplicates == 2
    assert s.current.examples == 10, "a duplicate never counts twice"
    s, _ = d.run(s, upd("b"), upd("c"))
    assert s.phase is Phase.AGGREGATING
    # A QoS 1 redelivery after the round closed is still a duplicate, not a late update.
    s, acts = d.run(s, upd("b"))
    assert of(acts, SendNack) == [] and s.current.duplicates == 3 and s.current.late == 0
    s, acts = d.run(s, AggregationDone(1))
    assert s.phase is Phase.FINISHED
    s, acts = d.run(s, upd("c"), upd("a", mid="x"))
    assert of(acts, SendNack) == [] and s.current.duplicates == 5


@scenario
def test_not_assigned_and_future_round_are_rejected(d: Driver) -> None:
    s = collecting(d, cfg(clients_per_round=2, quorum=1, min_clients=2), clients=("a", "b", "c"))
    outsider = ({"a", "b", "c"} - s.current.assigned).pop()
    s, acts = d.run(s, upd(outsider, mid="m1"), upd("zz", mid="m2"))
    nacks = of(acts, SendNack)
    assert [n.code for n in nacks] == ["not_assigned", "not_assigned"]
    assert nacks[0].reason == f"{outsider} is not assigned to round 1"
    insider = sorted(s.current.assigned)[0]
    s, acts = d.run(s, upd(insider, round_=2, mid="m3"))
    assert of(acts, SendNack)[0].code == "round"
    assert s.current.rejected == 3 and s.current.reported == ()


@scenario
def test_invalid_update_is_nacked_with_its_code_and_may_be_resent(d: Driver) -> None:
    s = collecting(d, cfg(quorum_fraction=1.0))
    s, acts = d.run(s, upd("a", ok=False, code="nan", reason="w holds 3 NaN/Inf value(s)"))
    assert of(acts, SendNack) == [SendNack("a", 1, "a-1", "nan", "w holds 3 NaN/Inf value(s)")]
    assert s.current.rejected == 1 and s.current.reported == ()
    s, acts = d.run(s, upd("a", mid="fixed"), upd("b"), upd("c"))
    assert s.phase is Phase.AGGREGATING and of(acts, SendNack) == []


# ------------------------------------------------------------------ after aggregation


@scenario
def test_full_run_with_realignment_every_second_round(d: Driver) -> None:
    s = collecting(d, cfg(rounds=4, realign_every=2, quorum_fraction=1.0), clients=("a", "b"))
    versions = 0
    for r in range(1, 5):
        assert s.round == r and s.phase is Phase.COLLECTING
        s, _ = d.run(s, upd("a", round_=r), upd("b", round_=r))
        s, acts = d.run(s, AggregationDone(r))
        assert s.adapter_round == r and s.record(r).outcome == "aggregated"
        if r == 2:
            assert s.phase is Phase.ALIGNING
            assert of(acts, StartAlignment) == [StartAlignment(2)]
            assert of(acts, PublishSchedule)[0].status == "aligning"
            versions += 1
            s, acts = d.run(s, AlignmentDone(versions))
            assert s.model_version == 1
        if r < 4:
            assert s.phase is Phase.PUBLISHING
            (sched,) = of(acts, PublishSchedule)
            assert (sched.round, sched.adapter_round, sched.model_version) == (r + 1, r, versions)
            s, _ = d.run(s, PublishDone(r + 1))
    # No re-alignment after the last round (r = 4 is a multiple of 2): the run finishes.
    assert s.phase is Phase.FINISHED
    assert of(acts, Finish) == [Finish(4)]
    assert [r.round for r in s.records] == [1, 2, 3, 4]


@scenario
def test_too_few_clients_after_aggregation_waits_then_resumes(d: Driver) -> None:
    s = collecting(d, cfg(rounds=2, min_clients=2, quorum=1), clients=("a", "b"))
    s, _ = d.run(s, upd("a"), upd("b"), ClientOffline("b"), Tick(T0 + 30))
    s, acts = d.run(s, AggregationDone(1))
    assert s.phase is Phase.WAITING and s.waiting_since == T0 + 30
    assert of(acts, PublishSchedule) == [PublishSchedule(2, "waiting", 0.0, 0, (), 1, 0)]
    s, acts = d.run(s, ClientOnline("b"))
    assert s.phase is Phase.PUBLISHING and s.round == 2


@scenario
def test_alignment_done_with_too_few_clients_waits(d: Driver) -> None:
    s = collecting(d, cfg(rounds=3, realign_every=1, quorum=1), clients=("a", "b"))
    s, _ = d.run(s, upd("a"), upd("b"), AggregationDone(1))
    assert s.phase is Phase.ALIGNING
    s, _ = d.run(s, ClientOffline("a"), AlignmentDone(3))
    assert s.phase is Phase.WAITING and s.model_version == 3
    s, _ = d.run(s, hello("c"))
    assert s.phase is Phase.PUBLISHING and s.current.assigned == {"b", "c"}


@scenario
def test_abort_fails_from_every_live_phase(d: Driver) -> None:
    config = cfg(rounds=3, realign_every=1, quorum=1)
    s0 = initial_state(config, run_id="run1", seed=1, now=T0)
    s, acts = d.run(s0, Abort("operator interrupt"))
    assert s.phase is Phase.FAILED and of(acts, Fail) == [Fail("operator interrupt")]
    s = initial_state(config, run_id="run1", seed=1, now=T0)
    s, _ = d.run(s, hello("a"), hello("b"))
    for done, phase in [
        ((), Phase.PUBLISHING),
        ((PublishDone(1),), Phase.COLLECTING),
        ((upd("a"), upd("b")), Phase.AGGREGATING),
        ((AggregationDone(1),), Phase.ALIGNING),
    ]:
        s, _ = d.run(s, *done)
        assert s.phase is phase
        failed, acts = d.run(s, Abort(f"stop in {phase.value}"))
        assert failed.phase is Phase.FAILED and failed.fail_reason == f"stop in {phase.value}"
        again, acts = d.run(failed, Abort("twice"))
        assert again == failed and acts == []


def test_stale_completion_events_are_ignored(d: Driver) -> None:
    s = collecting(d, cfg(quorum=1))
    for ev in (AggregationDone(1), AlignmentDone(2), PublishDone(1), PublishDone(7)):
        s2, acts = d.run(s, ev)
        assert s2 == s and acts == []
    s, _ = d.run(s, upd("a"), upd("b"), upd("c"))
    s2, acts = d.run(s, AggregationDone(5))
    assert s2 == s and acts == []


# ------------------------------------------------------------------ plumbing


def test_transition_not_in_table_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def bad(state: RoundState, event: Tick) -> tuple[RoundState, list]:
        return replace(state, phase=Phase.AGGREGATING), []

    monkeypatch.setitem(rounds._HANDLERS, Tick, bad)
    s = initial_state(cfg(), run_id="run1", seed=1, now=T0)
    with pytest.raises(RunStateError, match="waiting_for_clients -> aggregating"):
        step(s, Tick(T0 + 1))


def test_unknown_event_type_raises() -> None:
    s = initial_state(cfg(), run_id="run1", seed=1, now=T0)
    with pytest.raises(TypeError, match="not a round event"):
        step(s, "tick")  # type: ignore[arg-type]


def test_checkpoint_only_when_more_than_the_clock_changed(d: Driver) -> None:
    s = collecting(d, cfg())
    s2, acts = d.run(s, Tick(T0 + 1))
    assert acts == [] and s2.now == T0 + 1
    s3, acts = d.run(s2, upd("a"))
    assert acts == [PersistCheckpoint()]


def test_no_wall_clock_is_read(monkeypatch: pytest.MonkeyPatch, d: Driver) -> None:
    def boom() -> float:
        raise AssertionError("the state machine read the wall clock")

    # A log record stamps its creation time; that is logging's clock, not the state machine's.
    logging.getLogger("coordinator.run.rounds").setLevel(logging.WARNING)
    monkeypatch.setattr(time, "time", boom)
    monkeypatch.setattr(time, "monotonic", boom)
    s = collecting(d, cfg(quorum=2))
    s, _ = d.run(s, upd("a"), Tick(1e12), upd("b"), Tick(2e12), AggregationDone(1))
    logging.getLogger("coordinator.run.rounds").setLevel(logging.NOTSET)
    assert s.phase is Phase.PUBLISHING


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ((), [PublishSchedule]),
        ((PublishDone(1),), [PublishSchedule]),
        ((PublishDone(1), ClientOffline("b")), [PublishSchedule]),
        ((PublishDone(1), upd("a"), upd("b")), [RequestAggregation]),
        ((PublishDone(1), upd("a"), upd("b"), AggregationDone(1)), [PublishSchedule, StartAlignment]),
    ],
)
def test_start_reemits_what_the_phase_waits_on(prefix: tuple, expected: list[type], d: Driver) -> None:
    config = cfg(rounds=3, realign_every=1, quorum=1)
    s = initial_state(config, run_id="run1", seed=1, now=T0)
    s, _ = d.run(s, hello("a"), hello("b"), *prefix)
    resumed = RoundState.from_dict(json.loads(json.dumps(s.to_dict())))
    s2, acts = d.run(resumed, Start(T0 + 500))
    assert [type(a) for a in acts] == expected
    assert s2.phase is s.phase


def test_start_after_restart_in_finished_and_failed(d: Driver) -> None:
    s = collecting(d, cfg(rounds=1, quorum=1), clients=("a", "b"))
    s, _ = d.run(s, upd("a"), upd("b"), AggregationDone(1))
    _, acts = d.run(s, Start(T0 + 9))
    assert [type(a) for a in acts] == [PublishSchedule, Finish]
    f, _ = d.run(s, Abort("x"))  # terminal: ignored
    assert f.phase is Phase.FINISHED


def test_state_from_dict_rejects_garbage() -> None:
    s = initial_state(cfg(), run_id="run1", seed=1, now=T0)
    d = s.to_dict()
    with pytest.raises(RunStateError, match="state format"):
        RoundState.from_dict({**d, "format": 99})
    broken = dict(d)
    del broken["records"]
    with pytest.raises(RunStateError, match="corrupt round state"):
        RoundState.from_dict(broken)


def test_every_transition_in_the_table_is_exercised() -> None:
    d = Driver()
    for fn in _SCENARIOS:
        fn(d)
    missing = set(TRANSITIONS) - d.seen
    assert not missing, f"transitions never exercised: {sorted((a.value, b.value) for a, b in missing)}"
    assert d.seen <= set(TRANSITIONS)


# ------------------------------------------------------------------ liveness


def _next_round(d: Driver, s: RoundState, *reporters: str) -> RoundState:
    """Close the collecting round at its deadline with ``reporters``' updates, aggregate, publish the next."""
    s, _ = d.run(s, *(upd(c, round_=s.round) for c in reporters), Tick(s.current.deadline))
    s, _ = d.run(s, AggregationDone(s.round))
    if s.phase is Phase.PUBLISHING:
        s, _ = d.run(s, PublishDone(s.round))
    return s


def test_a_live_client_that_never_reports_is_not_waited_for_until_it_shows_life(d: Driver) -> None:
    s = collecting(d, cfg(rounds=6, quorum=2))  # min_clients = 3: a, b and c
    deadline = s.current.deadline
    s = _next_round(d, s, "a", "b")  # c stayed online and sent nothing: round 1 waited for it
    assert s.record(1).closed_at == deadline and s.client("c").missed == 1
    assert s.current.assigned == {"a", "b", "c"}  # still selected, and still counts for min_clients
    s, _ = d.run(s, upd("a", round_=2), upd("b", round_=2))
    assert s.phase is Phase.AGGREGATING and s.record(2).closed_at == s.now  # round 2 did not wait for c
    s, _ = d.run(s, AggregationDone(2), PublishDone(3))
    # A late update of a round it missed is life: round 3 waits for it again.
    s, acts = d.run(s, upd("c", round_=2, mid="c-late"))
    assert of(acts, SendNack)[0].code == "late" and s.client("c").missed == 0
    s, _ = d.run(s, upd("a", round_=3), upd("b", round_=3))
    assert s.phase is Phase.COLLECTING
    s, _ = d.run(s, upd("c", round_=3))  # and an update in time counts
    assert s.phase is Phase.AGGREGATING and s.client("c").missed == 0
    s, _ = d.run(s, AggregationDone(3), PublishDone(4))
    # So is a new hello, after missing again.
    s = _next_round(d, s, "a", "b")
    assert s.client("c").missed == 1 and "c" not in s.awaited()
    s, _ = d.run(s, hello("c"))
    assert s.client("c").missed == 0 and "c" in s.awaited()


def test_a_client_that_went_offline_is_not_counted_as_missing(d: Driver) -> None:
    s = collecting(d, cfg(rounds=3, quorum=2))
    s, _ = d.run(s, ClientOffline("c"))
    s, _ = d.run(s, upd("a"), upd("b"))  # closes at once: c is offline, nobody waits for it
    assert s.phase is Phase.AGGREGATING and s.client("c").missed == 0
    s, _ = d.run(s, AggregationDone(1), ClientOnline("c"))
    assert "c" in s.eligible_online() and s.phase is Phase.PUBLISHING


def test_max_missed_zero_never_leaves_a_client_out(d: Driver) -> None:
    s = collecting(d, cfg(rounds=3, quorum=2, max_missed=0))
    s = _next_round(d, s, "a", "b")
    assert s.client("c").missed == 1 and "c" in s.awaited()
    s, _ = d.run(s, upd("a", round_=2), upd("b", round_=2))
    assert s.phase is Phase.COLLECTING  # round 2 still waits for c
    with pytest.raises(ConfigError, match="max_missed must be >= 0"):
        cfg(max_missed=-1)


def test_a_state_saved_before_missed_counts_loads_with_none_missed() -> None:
    s = initial_state(cfg(), run_id="r", seed=0, now=T0)
    s, _ = step(s, hello("a"))
    d = s.to_dict()
    for c in d["clients"]:
        del c["missed"]
    assert RoundState.from_dict(d).client("a").missed == 0


def test_no_run_has_more_rounds_than_clients_accept() -> None:
    from shared.protocol import MAX_ROUND

    assert cfg(rounds=MAX_ROUND).rounds == MAX_ROUND
    with pytest.raises(ConfigError, match="clients refuse later rounds"):
        cfg(rounds=MAX_ROUND + 1)
