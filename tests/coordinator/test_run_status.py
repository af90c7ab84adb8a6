"""`fedsoda-coordinator status`: a run directory's status, read while the run may go on."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from rich.console import Console
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.run.checkpoint import RunDir
from coordinator.run.reports import ServingTotals, load_report, write_report
from coordinator.run.round_events import (
    Abort,
    AggregationDone,
    ClientHello,
    ClientOffline,
    ClientOnline,
    PublishDone,
    Tick,
    UpdateReceived,
)
from coordinator.run.round_state import Phase, RoundState
from coordinator.run.rounds import initial_state, step
from coordinator.run.run_status import (
    ClientState,
    read_status,
    status_dict,
    status_table,
    watch_status,
)
from coordinator.settings import RoundConfig
from shared.errors import RunStateError

T0 = 1_700_000_000.0
TIMEOUT = 60.0
MIB = 2**20
runner = CliRunner()


def advance(state: RoundState, *events: object) -> RoundState:
    for event in events:
        state, _ = step(state, event)  # type: ignore[arg-type]
    return state


def resources(sent: int, received: int, rss: int, gpu: int = 0) -> dict[str, object]:
    return {"peak_rss_bytes": rss, "peak_gpu_bytes": gpu, "wall_seconds": 3.0, "cpu_seconds": 5.0,
            "bytes_sent": sent, "bytes_received": received, "device_class": "cpu-16gb"}


def send(run: RunDir, state: RoundState, client: str, round_: int, res: dict[str, object], *, count: bool = True) -> RoundState:
    """Persist an update the way the server does (file first), then count it unless ``count`` is False."""
    run.save_update(round_, client, {"k": torch.ones(2)}, num_examples=40, message_id=f"{client}-{round_}",
                    metrics={"loss_last": 1.0}, resources=res)
    return advance(state, UpdateReceived(client, round_, f"{client}-{round_}", 40)) if count else state


def collecting_run(path: Path, *, rounds: int = 2) -> tuple[RunDir, RoundState]:
    """Round 1 collecting: a sent, b and d training, c went offline, e (late hello) and f (refused) idle."""
    config = RoundConfig(rounds=rounds, min_clients=4, quorum=2, round_timeout_s=TIMEOUT)
    state = advance(
        initial_state(config, run_id="demo", seed=1, now=T0),
        *(ClientHello(c, tier, True, 40) for c, tier in (("a", "L4"), ("b", "L4"), ("c", "L2"), ("d", "L2"))),
        PublishDone(1),
        ClientHello("e", "L2", True, 40),
        ClientHello("f", "", False, 40),
        ClientOffline("c"),
    )
    run = RunDir.create(path, state)
    state = send(run, state, "a", 1, resources(1_000_000, 50 * MIB, 700 * MIB))
    run.save_state(state)
    assert state.phase is Phase.COLLECTING and state.current is not None
    assert state.current.assigned == {"a", "b", "c", "d"}
    return run, state


def states(path: Path) -> dict[str, str]:
    return {c.client_id: c.state.value for c in read_status(path).clients}


def test_each_client_state_while_a_round_collects(tmp_path: Path) -> None:
    collecting_run(tmp_path / "run")
    status = read_status(tmp_path / "run")
    assert (status.run_id, status.phase, status.round, status.rounds, status.model_version) == ("demo", Phase.COLLECTING, 1, 2, 0)
    assert states(tmp_path / "run") == {"a": "sent", "b": "training", "c": "offline", "d": "training", "e": "idle", "f": "idle"}
    f = next(c for c in status.clients if c.client_id == "f")
    assert (f.accepted, f.tier) == (False, "")


def test_an_update_on_disk_that_the_state_does_not_count_yet_is_sent(tmp_path: Path) -> None:
    # The server persists an update before its state counts it; status reads that window right.
    run, state = collecting_run(tmp_path / "run")
    send(run, state, "b", 1, resources(10, 20, 30), count=False)
    assert read_status(tmp_path / "run").current.reported == ("a",)  # type: ignore[union-attr]
    assert states(tmp_path / "run")["b"] == "sent"


def test_clients_that_missed_the_deadline_are_late(tmp_path: Path) -> None:
    run, state = collecting_run(tmp_path / "run")
    state = send(run, state, "b", 1, resources(10, 20, 30))
    state = advance(state, Tick(T0 + TIMEOUT))  # quorum met at the deadline: the round closes
    run.save_state(state)
    assert state.phase is Phase.AGGREGATING
    assert states(tmp_path / "run") == {"a": "sent", "b": "sent", "c": "offline", "d": "late", "e": "idle", "f": "idle"}


def test_a_client_back_after_its_round_closed_early_is_late(tmp_path: Path) -> None:
    # The round closes before its deadline once every live client reported; c, away then,
    # comes back to a round that takes no more updates.
    run, state = collecting_run(tmp_path / "run")
    state = send(run, state, "b", 1, resources(10, 20, 30))
    state = send(run, state, "d", 1, resources(10, 20, 30))
    assert state.phase is Phase.AGGREGATING and state.now < state.current.deadline  # type: ignore[union-attr]
    run.save_state(advance(state, ClientOnline("c")))
    assert states(tmp_path / "run") == {"a": "sent", "b": "sent", "c": "late", "d": "sent", "e": "idle", "f": "idle"}


def test_a_deadline_passed_by_the_state_clock_makes_an_open_round_late(tmp_path: Path) -> None:
    # The rule reads the state's clock, not only the round's outcome: a state whose clock is
    # at the deadline makes the assigned clients without an update late.
    run, state = collecting_run(tmp_path / "run")
    run.save_state(dataclasses.replace(state, now=T0 + TIMEOUT))
    assert read_status(tmp_path / "run").current.outcome == "open"  # type: ignore[union-attr]
    assert states(tmp_path / "run")["d"] == "late"


def test_bytes_and_memory_over_rounds(tmp_path: Path) -> None:
    run, state = collecting_run(tmp_path / "run")
    state = send(run, state, "b", 1, resources(2_000, 40 * MIB, 300 * MIB))
    state = advance(state, Tick(T0 + TIMEOUT), AggregationDone(1))
    # c is offline, the other four accepted clients are eligible: round 2 selects them all.
    assert state.phase is Phase.PUBLISHING and state.round == 2
    state = advance(state, PublishDone(2))
    # Counters are cumulative: a's second report carries its totals so far.
    state = send(run, state, "a", 2, resources(2_500_000, 60 * MIB, 600 * MIB, gpu=2**30))
    run.save_state(state)
    status = read_status(tmp_path / "run")
    a = next(c for c in status.clients if c.client_id == "a")
    assert (a.rounds_sent, a.bytes_sent, a.bytes_received) == (2, 2_500_000, 60 * MIB)
    assert (a.peak_rss_bytes, a.peak_gpu_bytes) == (700 * MIB, 2**30)
    b = next(c for c in status.clients if c.client_id == "b")
    assert (b.rounds_sent, b.bytes_sent, b.peak_rss_bytes, b.state) == (1, 2_000, 300 * MIB, ClientState.TRAINING)
    d = next(c for c in status.clients if c.client_id == "d")
    assert (d.rounds_sent, d.bytes_sent, d.peak_rss_bytes, d.state) == (0, 0, 0, ClientState.TRAINING)
    assert states(tmp_path / "run")["e"] == "training"  # selected in round 2


def test_json_via_the_cli(tmp_path: Path) -> None:
    collecting_run(tmp_path / "run")
    result = runner.invoke(app, ["status", str(tmp_path / "run"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == status_dict(read_status(tmp_path / "run"))
    assert {k: data[k] for k in ("run_id", "phase", "terminal", "round", "rounds", "model_version")} == {
        "run_id": "demo", "phase": "collecting", "terminal": False, "round": 1, "rounds": 2, "model_version": 0,
    }
    assert data["current_round"]["reported"] == ["a"] and data["current_round"]["quorum"] == 2
    assert data["clients"]["a"] == {
        "tier": "L4", "accepted": True, "online": True, "state": "sent", "rounds_sent": 1,
        "bytes_sent": 1_000_000, "bytes_received": 50 * MIB, "peak_rss_bytes": 700 * MIB, "peak_gpu_bytes": 0,
    }
    assert {c: row["state"] for c, row in data["clients"].items()} == {
        "a": "sent", "b": "training", "c": "offline", "d": "training", "e": "idle", "f": "idle",
    }


def test_the_table_shows_the_run_and_every_client(tmp_path: Path) -> None:
    collecting_run(tmp_path / "run")
    result = runner.invoke(app, ["status", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the table is for people: stderr, like every other table
    shown = result.output
    assert "run demo: collecting, round 1/2, model v0" in shown
    assert "round 1 open: 1 of 4 sent, quorum 2" in shown
    for line, words in (("a ", ("L4", "sent", "1", "50.0", "0.95", "0.68")), ("c ", ("offline",)), ("f ", ("refused", "idle"))):
        row = next(r for r in shown.splitlines() if r.strip().startswith(line))
        assert all(w in row.split() for w in words), row


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no such folder"),
        (lambda p: p.mkdir(), "it has no state.json"),
        (lambda p: (p.mkdir(), (p / "state.json").write_text('{"phase": "coll')), "not valid JSON"),
        (lambda p: (p.mkdir(), (p / "state.json").write_text("[1, 2]")), "does not hold a JSON object"),
        (lambda p: (p.mkdir(), (p / "state.json").write_text('{"format": 1}')), "corrupt round state"),
    ],
    ids=["missing", "no-state", "garbage", "not-an-object", "fields-missing"],
)
def test_a_folder_that_is_no_readable_run_is_a_one_line_error(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "run"
    make(folder)
    with pytest.raises(RunStateError, match=message):
        read_status(folder)
    for args in ([], ["--json"], ["--watch", "--interval", "0.1"]):
        result = runner.invoke(app, ["status", str(folder), *args])
        assert result.exit_code == RunStateError.exit_code == 10
        assert result.stdout == ""
        assert result.output.strip().startswith("error:") and message in result.output
        assert len(result.output.strip().splitlines()) == 1


def finished_run(path: Path) -> None:
    run, state = collecting_run(path, rounds=1)
    state = send(run, state, "b", 1, resources(10, 20, 30))
    state = advance(state, Tick(T0 + TIMEOUT), AggregationDone(1))
    assert state.phase is Phase.FINISHED
    run.save_state(state)


def test_watch_on_a_finished_run_prints_the_final_view_once(tmp_path: Path) -> None:
    finished_run(tmp_path / "run")
    result = runner.invoke(app, ["status", str(tmp_path / "run"), "--watch", "--interval", "30"])
    assert result.exit_code == 0, result.output
    assert result.output.count("run demo: finished, round 1/1") == 1
    result = runner.invoke(app, ["status", str(tmp_path / "run"), "--watch", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert (data["phase"], data["terminal"]) == ("finished", True)
    assert data["clients"]["d"]["state"] == "late"


def test_status_and_the_final_report_agree_on_traffic_and_memory(tmp_path: Path) -> None:
    # Both read the persisted updates through reports.update_entries and per_client_rounds.
    finished_run(tmp_path / "run")
    run = RunDir(tmp_path / "run")
    totals = ServingTotals(chunks_served=0, bytes_served=0, refused={}, ignored={}, bytes_sent=0, bytes_received=0)
    write_report(run, run.load_state(), method="fedsoda", aggregation="fedavg", aggregation_settings={}, task={}, assignments={}, tiers={},
                 totals=totals, results={})
    rows = load_report(tmp_path / "run")["per_client_round"]
    for c in read_status(tmp_path / "run").clients:
        mine = [r for r in rows if r["client_id"] == c.client_id]
        assert (c.rounds_sent, c.bytes_sent, c.bytes_received) == (
            len(mine), sum(r["bytes_up"] for r in mine), sum(r["bytes_down"] for r in mine))
        assert c.peak_rss_bytes == max((r["peak_rss_bytes"] for r in mine), default=0)
    assert {r["client_id"] for r in rows} == {"a", "b"}


def test_watch_rereads_until_the_run_ends(tmp_path: Path) -> None:
    collecting_run(tmp_path / "run")
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        # Between two reads the coordinator moves on; the second wait ends the run.
        waits.append(seconds)
        assert len(waits) <= 2, "the watch did not stop at the end of the run"
        run = RunDir(tmp_path / "run")
        state = run.load_state()
        if len(waits) == 1:
            state = send(run, state, "b", 1, resources(10, 20, 30))
        else:
            state = advance(state, Abort("operator stopped the run"))
        run.save_state(state)

    with open(tmp_path / "live.txt", "w") as out:
        status = watch_status(tmp_path / "run", interval=0.5, console=Console(file=out, width=120), sleep=sleep)
    assert waits == [0.5, 0.5]
    assert (status.phase, status.terminal, status.fail_reason) == (Phase.FAILED, True, "operator stopped the run")
    assert {c.client_id: c.state for c in status.clients}["b"] is ClientState.SENT


def test_ctrl_c_stops_the_watch_with_the_last_status(tmp_path: Path) -> None:
    collecting_run(tmp_path / "run")

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    with open(tmp_path / "live.txt", "w") as out:
        status = watch_status(tmp_path / "run", interval=2, console=Console(file=out), sleep=interrupted)
    assert (status.phase, status.terminal) == (Phase.COLLECTING, False)


def test_the_table_of_a_run_before_its_first_round(tmp_path: Path) -> None:
    config = RoundConfig(rounds=3, min_clients=2)
    state = advance(initial_state(config, run_id="early", seed=1, now=T0), ClientHello("a", "L4", True, 10))
    RunDir.create(tmp_path / "run", state)
    status = read_status(tmp_path / "run")
    assert status.current is None and status_dict(status)["current_round"] is None
    assert [c.state for c in status.clients] == [ClientState.IDLE]
    with open(tmp_path / "out.txt", "w") as out:
        console = Console(record=True, width=120, file=out)
        console.print(status_table(status))
    text = console.export_text()
    assert "run early: waiting_for_clients, round 0/3, model v0" in text and "no round started yet" in text
