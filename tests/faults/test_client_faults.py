"""Client faults, three at once in one run of three clients (each asserted by its own test).

Round 1 (its deadline moves on by 20 s while it has no report at all):

* b is killed (SIGKILL) mid-training, once its first training checkpoint is on disk, and
  restarted with the same id and state folder: it rejoins round 1 (its Last Will had marked
  it offline, its hello marks it online again) and resumes training from the checkpoint;
* c goes silent without a clean disconnect (SIGSTOP: no DISCONNECT, no pings) with a 2 s
  keepalive: the broker publishes its Last Will after 1.5 x keepalive, the coordinator marks
  it offline and stops waiting for it; thawed after the round, its update is refused as late;
* a is slow (frozen mid-training past the deadline; its 600 s keepalive keeps it connected,
  as a slow device's network stack would): the round closes at the deadline without it,
  and the update it sends afterwards is refused with the reason and not averaged.

Round 2 waits for c to be back online (min_clients = 3) and runs with all three. The
module-scoped fixture runs the scenario once; the tests read what it recorded.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import pytest

from benchmarks.harness import Federation, Ledger, check_ledger, light_settings
from edge_client.outbox import PENDING_FILE
from shared.mosquitto import start_mosquitto

pytestmark = pytest.mark.integration

STARTUP = 300.0
STEP = 120.0
ROUND_TIMEOUT = 20.0


@dataclass
class ClientFaults:
    """What the scenario recorded."""

    fed: Federation
    report: dict
    ledger: Ledger
    accepted_before: set[tuple[int, str]]


@pytest.fixture(scope="module")
def client_faults(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("client-faults")
    broker = start_mosquitto()
    settings = light_settings(
        "client-faults", tiny_model_dir, broker.port,
        rounds={"rounds": 2, "min_clients": 3, "quorum": 1, "round_timeout_s": ROUND_TIMEOUT, "max_extensions": 20},
        training={"local_steps": 8},  # the client checkpoints every 5 steps: one lands mid-training
    )
    fed = Federation.create(root, broker, settings, ["a", "b", "c"])
    try:
        fed.serve()
        fed.join("a", "--keepalive", "600")
        fed.join("b")
        fed.join("c", "--keepalive", "2")

        # All three train round 1 at once: c falls silent and a stalls as soon as they start,
        # b is frozen on its first checkpoint (mid-training), then killed and restarted.
        checkpoint = fed.state_dir("b") / "train" / "train_state.json"
        frozen: set[str] = set()

        def freeze_on_progress() -> bool:
            for name, reached in (("c", lambda: fed.training("c", 1)), ("a", lambda: fed.training("a", 1)),
                                  ("b", checkpoint.exists)):
                if name not in frozen and reached():
                    fed.procs.signal(name, signal.SIGSTOP)
                    frozen.add(name)
            return len(frozen) == 3

        fed.wait(freeze_on_progress, "a and c training round 1, b's first checkpoint", STARTUP)
        assert not (fed.state_dir("b") / PENDING_FILE).exists() and "b" not in fed.accepted_in(1)
        fed.procs.kill("b")
        accepted_before = fed.accepted()
        fed.wait(lambda: "c is offline (connection lost)" in fed.procs.log("coordinator"), "c's Last Will", STEP)
        fed.join("b")

        # The deadline closes round 1 on b's report; then a and c come back.
        fed.wait(lambda: fed.aggregated(1), "round 1 closed at its deadline", STARTUP)
        accepted_before |= fed.accepted()
        fed.procs.signal("a", signal.SIGCONT)
        fed.procs.signal("c", signal.SIGCONT)
        report = fed.finish(STARTUP)
        yield ClientFaults(fed, report, check_ledger(fed.run_dir, accepted_before), accepted_before)
    finally:
        fed.procs.kill_all()
        broker.close()


def test_client_killed_mid_training_resumes_the_round(client_faults):
    fed, report = client_faults.fed, client_faults.report
    round1 = report["rounds"][0]
    assert round1["reported"] == ["b"]
    (update,) = [u for u in report["updates"] if (u["round"], u["client_id"]) == (1, "b")]
    assert update["metrics"]["resumed_from_step"] == 5  # from the checkpoint, not step 0
    assert fed.procs.log("b").count("local rows in") == 2  # two incarnations
    assert fed.outcome("b")["rounds_sent"] == [1, 2]
    assert client_faults.ledger.accepted == {(1, "b"), (2, "a"), (2, "b"), (2, "c")}


def test_silent_client_is_dropped_by_its_last_will(client_faults):
    fed, report = client_faults.fed, client_faults.report
    round1, round2 = report["rounds"]
    assert "c" in dict(round1["participants"]) and "c" not in round1["reported"]
    log = fed.procs.log("coordinator")
    assert log.index("c is offline (connection lost)") < log.index("round 1 aggregated")
    # Its round-1 update, sent once thawed, is refused; then it rejoins for round 2.
    assert [n["code"] for n in fed.outcome("c")["nacks"] if n["round"] == 1] == ["late"]
    assert (1, "c") not in client_faults.ledger.accepted and "c" in round2["reported"]


def test_slow_client_past_the_deadline_is_refused_and_not_averaged(client_faults):
    fed, report = client_faults.fed, client_faults.report
    round1 = report["rounds"][0]
    assert round1["dropouts"] == 2 and round1["late"] == 2  # a (slow) and c (silent)
    (nack,) = [n for n in fed.outcome("a")["nacks"] if n["round"] == 1]
    assert nack["code"] == "late" and "round 1" in nack["reason"] and "closed" in nack["reason"]
    # Not averaged: round 1's aggregate is b's update alone (check_ledger recomputed it).
    assert (1, "a") not in client_faults.ledger.accepted
    assert "a" in report["rounds"][1]["reported"]  # and a carries on in round 2
