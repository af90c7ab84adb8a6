"""The coordinator killed (SIGKILL) mid-round and mid-aggregation, then ``serve --resume``.

Mid-round: client b is frozen (SIGSTOP) before it can train, so round 1 stays open after
a's update is accepted; the coordinator is killed there, restarted with ``--resume``, and
b is thawed: its update reaches the new coordinator through its persistent MQTT session.
Mid-aggregation: the resumed coordinator runs with the documented test hook
``FEDSODA_FAULT_PAUSE=aggregation:2`` (coordinator/run/server.py), so it stops itself after
FedAvg of round 2 and before saving the result; the test kills it there and resumes again.
"""

from __future__ import annotations

import signal

import pytest

from benchmarks.harness import check_ledger
from coordinator.run.server import FAULT_PAUSE_ENV

pytestmark = pytest.mark.integration

STARTUP = 300.0  # imports, packaging, download on a shared 2-core box
STEP = 120.0


def test_coordinator_killed_mid_round_and_mid_aggregation_resumes(federation):
    fed = federation(["a", "b"], rounds={"rounds": 2})
    fed.serve()
    fed.join("a")
    # b may stay frozen well past the default keepalive: keep its Last Will out of this test.
    fed.join("b", "--keepalive", "600")
    fed.wait(lambda: "fits" in fed.procs.log("b"), "b assigned a tier", STARTUP)
    fed.procs.signal("b", signal.SIGSTOP)

    # Mid-round: a's round-1 update is accepted, b's cannot be (frozen), so round 1 is open.
    fed.wait(lambda: fed.accepted_in(1) == {"a"}, "a's round-1 update accepted", STARTUP)
    assert fed.phase() == (1, "collecting")
    accepted_before = fed.accepted()
    fed.procs.kill("coordinator")
    fed.serve(resume=True, env={FAULT_PAUSE_ENV: "aggregation:2"})
    fed.procs.signal("b", signal.SIGCONT)
    fed.wait(lambda: fed.aggregated(1), "round 1 aggregated after the resume", STARTUP)

    # Mid-aggregation: the hook stops the coordinator between FedAvg and saving round 2.
    fed.wait(lambda: fed.procs.stopped("coordinator"), "the coordinator paused mid-aggregation", STEP)
    assert fed.phase() == (2, "aggregating") and not fed.aggregated(2)
    accepted_before |= fed.accepted()
    assert fed.accepted_in(2) == {"a", "b"}
    fed.procs.kill("coordinator")
    fed.serve(resume=True)

    report = fed.finish(STARTUP)
    ledger = check_ledger(fed.run_dir, accepted_before)
    assert ledger.accepted == {(1, "a"), (1, "b"), (2, "a"), (2, "b")}
    assert [r["reported"] for r in report["rounds"]] == [["a", "b"], ["a", "b"]]
    assert fed.outcome("a")["rounds_sent"] == [1, 2] and fed.outcome("b")["rounds_sent"] == [1, 2]
    assert fed.procs.log("coordinator").count("resumed run") == 2
