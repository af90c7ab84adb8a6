"""Run-directory persistence: atomic writes, persisted updates, kill-and-resume equivalence."""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coordinator.run import checkpoint
from coordinator.run.aggregation import FedAvg
from coordinator.run.checkpoint import RunDir, atomic_write_bytes, load_run
from coordinator.run.round_events import (
    AggregationDone,
    AlignmentDone,
    ClientHello,
    ClientOffline,
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
from coordinator.run.round_state import Phase, RoundState
from coordinator.run.rounds import admission, initial_state, step
from coordinator.settings import RoundConfig
from shared.errors import RunStateError

T0 = 5_000.0
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def fresh_state(**kw: object) -> RoundState:
    fields: dict[str, object] = {"rounds": 2, "min_clients": 2, "quorum": 2, "round_timeout_s": 30.0, **kw}
    config = RoundConfig(**fields)  # type: ignore[arg-type]
    return initial_state(config, run_id="run1", seed=3, now=T0)


def delta(seed: float) -> dict[str, torch.Tensor]:
    return {
        KEY_A: torch.arange(6, dtype=torch.float32).reshape(2, 3) * seed,
        KEY_B: torch.full((3, 2), seed, dtype=torch.bfloat16),
    }


def collecting_state() -> RoundState:
    s = fresh_state()
    for ev in (ClientHello("a", "small", True, 4), ClientHello("b", "big", True, 6), PublishDone(1)):
        s, _ = step(s, ev)
    assert s.phase is Phase.COLLECTING
    return s


# ------------------------------------------------------------------ state.json


def test_state_round_trips_and_create_refuses_an_existing_run(tmp_path: Path) -> None:
    s = collecting_state()
    run = RunDir.create(tmp_path / "run", s)
    assert run.load_state() == s
    assert json.loads(run.state_path.read_text())["phase"] == "collecting"
    with pytest.raises(RunStateError, match="already holds a run"):
        RunDir.create(tmp_path / "run", s)
    with pytest.raises(RunStateError, match="not a run directory"):
        RunDir(tmp_path / "empty").load_state()


def test_corrupt_state_json_is_a_run_state_error(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, fresh_state())
    run.state_path.write_text('{"phase": "coll')
    with pytest.raises(RunStateError, match="not valid JSON"):
        run.load_state()
    run.state_path.write_text("[1, 2]")
    with pytest.raises(RunStateError, match="JSON object"):
        run.load_state()


def test_interrupted_writes_never_corrupt_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old = fresh_state()
    run = RunDir.create(tmp_path, old)
    # A temp file left by a coordinator killed mid-write is ignored.
    (tmp_path / ".state.json.tmp-999-deadbeef").write_bytes(b'{"format": 1, "phase": "fin')
    assert run.load_state() == old

    new = collecting_state()

    def killed_after_half(fd: int) -> None:
        raise OSError("killed during fsync")

    monkeypatch.setattr(os, "fsync", killed_after_half)
    with pytest.raises(OSError, match="killed"):
        run.save_state(new)
    monkeypatch.undo()
    assert run.load_state() == old

    def replace_fails(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError, match="disk full"):
        run.save_state(new)
    monkeypatch.undo()
    assert run.load_state() == old
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".state.json.tmp"))
    assert leftovers == [".state.json.tmp-999-deadbeef"], "failed writes must clean up their temp file"
    run.save_state(new)
    assert run.load_state() == new


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    target = tmp_path / "x.bin"
    atomic_write_bytes(target, b"a" * 1000)
    atomic_write_bytes(target, b"b")
    assert target.read_bytes() == b"b"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


# ------------------------------------------------------------------ updates


def test_update_persisted_once_first_wins_and_reloads_exactly(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, fresh_state())
    first = delta(1.5)
    assert run.save_update(1, "a", first, num_examples=4, message_id="m1",
                           metrics={"loss": 0.5}, resources={"peak_rss_bytes": 123})
    assert not run.save_update(1, "a", delta(9.0), num_examples=99, message_id="m2")
    (persisted,) = run.updates(1)
    assert (persisted.client_id, persisted.round, persisted.num_examples, persisted.message_id) == ("a", 1, 4, "m1")
    assert persisted.metrics == {"loss": 0.5} and persisted.resources == {"peak_rss_bytes": 123}
    loaded = persisted.load_delta()
    assert set(loaded) == set(first)
    for k in first:
        assert loaded[k].dtype == first[k].dtype and torch.equal(loaded[k], first[k])
    assert run.updates(2) == []


def test_orphan_tensors_without_metadata_do_not_count(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, fresh_state())
    folder = run.round_dir(1)
    folder.mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"half a file")
    (folder / ".a.json.tmp-1-ab").write_bytes(b"{")
    assert run.updates(1) == []
    assert run.save_update(1, "a", delta(2.0), num_examples=4, message_id="m1")
    (u,) = run.updates(1)
    assert torch.equal(u.load_delta()[KEY_A], delta(2.0)[KEY_A])


def test_tampered_update_file_is_detected(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, fresh_state())
    run.save_update(1, "a", delta(1.0), num_examples=4, message_id="m1")
    (u,) = run.updates(1)
    u.tensors_path.write_bytes(u.tensors_path.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(RunStateError, match="sha256"):
        u.load_delta()
    (run.round_dir(1) / "a.json").write_text("{}")
    with pytest.raises(RunStateError, match="corrupt"):
        run.updates(1)


@pytest.mark.parametrize("client_id", ["../evil", "a/b", ".hidden", "x" * 300, "ünï"])
def test_unsafe_client_ids_stay_inside_the_round_folder(tmp_path: Path, client_id: str) -> None:
    run = RunDir.create(tmp_path / "run", fresh_state())
    assert run.save_update(1, client_id, delta(1.0), num_examples=1, message_id="m")
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert f.parent in (run.path, run.round_dir(1)), f"{f} escaped the round folder"
    (u,) = run.updates(1)
    assert u.client_id == client_id and u.tensors_path.parent == run.round_dir(1)


def test_global_adapter_round_trip(tmp_path: Path) -> None:
    run = RunDir.create(tmp_path, fresh_state())
    g = delta(0.25)
    path = run.save_global(0, g)
    assert path == tmp_path / "global" / "round_0000.safetensors"
    loaded = run.load_global(0)
    assert all(torch.equal(loaded[k], g[k]) and loaded[k].dtype == g[k].dtype for k in g)
    with pytest.raises(RunStateError, match="no global adapter for round 3"):
        run.load_global(3)


# ------------------------------------------------------------------ resume


def test_load_run_counts_an_update_persisted_just_before_a_crash(tmp_path: Path) -> None:
    s = collecting_state()
    run = RunDir.create(tmp_path, s)
    run.save_update(1, "a", delta(1.0), num_examples=4, message_id="ma")
    s, _ = step(s, UpdateReceived("a", 1, "ma", 4))
    run.save_state(s)
    run.save_update(1, "b", delta(2.0), num_examples=6, message_id="mb")  # then killed

    resumed = load_run(tmp_path)
    assert resumed.state.current.reported == ("a", "b")
    assert resumed.state.current.examples == 10
    assert resumed.state.phase is Phase.AGGREGATING, "b's report closes the round"
    assert [u.client_id for u in resumed.updates] == ["a", "b"]
    assert run.load_state() == resumed.state, "load_run persists the reconciled state"
    again = load_run(tmp_path)
    assert again.state == resumed.state and [u.client_id for u in again.updates] == ["a", "b"]
    _, acts = step(again.state, Start(T0 + 100))
    assert acts == [RequestAggregation(1, ("a", "b"))]


def test_load_run_refuses_a_counted_update_whose_file_is_gone(tmp_path: Path) -> None:
    s = collecting_state()
    s, _ = step(s, UpdateReceived("a", 1, "ma", 4))
    RunDir.create(tmp_path, s)
    with pytest.raises(RunStateError, match="files are missing"):
        load_run(tmp_path)


def test_load_run_after_aggregation_returns_no_updates(tmp_path: Path) -> None:
    s = collecting_state()
    run = RunDir.create(tmp_path, s)
    for cid, n in (("a", 4), ("b", 6)):
        run.save_update(1, cid, delta(float(n)), num_examples=n, message_id=cid)
        s, _ = step(s, UpdateReceived(cid, 1, cid, n))
    s, _ = step(s, AggregationDone(1))
    run.save_state(s)
    resumed = load_run(tmp_path)
    assert resumed.state == s and resumed.updates == ()


class Crash(Exception):
    """The simulated kill -9."""


class MiniServer:
    """The server loop's persistence discipline in miniature (the real one is coordinator.run.server)."""

    def __init__(self, run: RunDir, state: RoundState, on_op: Callable[[], None]) -> None:
        self.run, self.state, self.on_op = run, state, on_op
        self.nacks: list[SendNack] = []

    def feed(self, message: tuple) -> None:
        kind, *args = message
        if kind == "update":
            cid, round_, n, d = args
            if admission(self.state, cid, round_).accepted:
                self.on_op()
                self.run.save_update(round_, cid, d, num_examples=n, message_id=f"{cid}-{round_}")
            self.apply(UpdateReceived(cid, round_, f"{cid}-{round_}", n))
        else:
            self.apply(args[0])

    def apply(self, event: object) -> None:
        queue = deque([event])
        while queue:
            self.state, actions = step(self.state, queue.popleft())  # type: ignore[arg-type]
            for action in actions:
                self.on_op()
                if isinstance(action, PersistCheckpoint):
                    self.run.save_state(self.state)
                elif isinstance(action, PublishSchedule) and action.status == "running":
                    queue.append(PublishDone(action.round))
                elif isinstance(action, RequestAggregation):
                    base = self.run.load_global(self.state.adapter_round)
                    ups = [u for u in self.run.updates(action.round) if u.client_id in action.client_ids]
                    new = FedAvg().aggregate(base, ((u.num_examples, u.load_delta()) for u in ups))
                    self.on_op()
                    self.run.save_global(action.round, new)
                    queue.append(AggregationDone(action.round))
                elif isinstance(action, StartAlignment):
                    queue.append(AlignmentDone(self.state.model_version + 1))
                elif isinstance(action, SendNack):
                    self.nacks.append(action)


def script() -> list[tuple]:
    """Broker traffic of a 3-round run: hellos, updates (one late, one duplicate), ticks, a Last Will."""
    deadline2 = T0 + 30.0
    return [
        ("event", ClientHello("a", "small", True, 4)),
        ("event", ClientHello("b", "big", True, 6)),
        ("event", ClientHello("c", "big", True, 5)),
        ("update", "a", 1, 4, delta(1.0)),
        ("update", "b", 1, 6, delta(2.0)),
        ("update", "b", 1, 6, delta(2.0)),
        ("update", "c", 1, 5, delta(-3.0)),
        ("update", "c", 2, 5, delta(0.5)),
        ("update", "a", 2, 4, delta(4.0)),
        ("event", Tick(deadline2)),
        ("update", "b", 2, 6, delta(7.0)),
        ("update", "a", 3, 4, delta(1.25)),
        ("event", ClientOffline("b")),
        ("update", "c", 3, 5, delta(-1.0)),
    ]


def run_script(tmp_path: Path, crash_at: int | None) -> tuple[RunDir, RoundState, int]:
    """Run the script; with ``crash_at`` kill the server before op ``crash_at`` and resume."""
    counter = {"ops": 0}

    def on_op() -> None:
        counter["ops"] += 1
        if crash_at is not None and counter["ops"] == crash_at:
            raise Crash

    state = fresh_state(rounds=3, min_clients=3, quorum=2, realign_every=2)
    run = RunDir.create(tmp_path, state)
    run.save_global(0, {KEY_A: torch.zeros(2, 3), KEY_B: torch.zeros(3, 2, dtype=torch.bfloat16)})
    server = MiniServer(run, state, on_op)
    messages: list[tuple] = [("event", Start(T0)), *script()]
    i = 0
    crashed = False
    while i < len(messages):
        try:
            server.feed(messages[i])
            i += 1
        except Crash:
            crashed = True
            while True:  # the resume itself may be killed too
                try:
                    resumed = load_run(tmp_path)
                    server = MiniServer(resumed.run_dir, resumed.state, on_op)
                    server.apply(Start(resumed.state.now))  # no time passed in this script
                    break
                except Crash:
                    pass
            # QoS 1: the message being handled at the kill is delivered again (i stays).
    assert crashed or crash_at is None or crash_at > counter["ops"]
    return run, server.state, counter["ops"]


def test_killed_at_any_point_resumes_to_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kill before every durable write / action in turn; each resumed run ends as the reference.

    fsync is stubbed out here for speed: kills are simulated between operations, not by
    power loss (test_interrupted_writes_never_corrupt_state covers torn writes).
    """
    monkeypatch.setattr(os, "fsync", lambda fd: None)
    ref_run, ref_state, total_ops = run_script(tmp_path / "ref", None)
    assert ref_state.phase is Phase.FINISHED
    assert [r.reported for r in ref_state.records] == [("a", "b", "c"), ("a", "c"), ("a", "c")]
    assert ref_state.model_version == 1
    reference = [ref_run.load_global(r) for r in (1, 2, 3)]
    assert total_ops > 20
    for crash_at in range(1, total_ops + 1):
        run, state, _ = run_script(tmp_path / f"crash{crash_at}", crash_at)
        where = f"killed before op {crash_at}"
        assert state.phase is Phase.FINISHED, where
        assert [(r.reported, r.examples) for r in state.records] == [
            (r.reported, r.examples) for r in ref_state.records
        ], where
        for r, ref in zip((1, 2, 3), reference, strict=True):
            got = run.load_global(r)
            assert all(torch.equal(got[k], ref[k]) for k in ref), f"{where}: global adapter {r} differs"


def test_atomic_write_used_for_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []
    real = checkpoint.atomic_write_bytes

    def spy(path: Path, data: bytes) -> None:
        written.append(path.name)
        real(path, data)

    monkeypatch.setattr(checkpoint, "atomic_write_bytes", spy)
    run = RunDir.create(tmp_path, fresh_state())
    run.save_update(1, "a", delta(1.0), num_examples=1, message_id="m")
    run.save_global(1, delta(1.0))
    assert written == ["state.json", "a.safetensors", "a.json", "round_0001.safetensors"]
