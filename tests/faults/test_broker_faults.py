"""The broker killed (SIGKILL: its retained messages, sessions and queues are lost) and restarted, twice.

Mid-chunk-transfer (round 1): client a is frozen while it holds only part of the sub-LLM,
the broker is killed, a is killed too (its download interrupted for good), the broker and
a restart: a takes the chunks it already verified from its cache and fetches only the rest,
while b (downloading meanwhile) and the coordinator reconnect and carry on. The restarted a
needs the sub-LLM manifest the crash wiped from the broker: the coordinator publishes its
retained messages again when it finds the broker has lost its session.
Mid-round (round 2), the worst case: the coordinator has crashed (SIGKILL) when a's update
reaches the broker, which acknowledges it and queues it for the coordinator's session; b is
frozen mid-training. The broker is killed with a's update in its queue. Thawed, b publishes
while the broker is down and is killed before the broker could acknowledge its update (it
waits in b's memory). The broker, the coordinator (``serve --resume``) and b come back: b
sends its saved update again, and a, having found the broker without its session, sends
its update again when the coordinator publishes the round's schedule anew.

Without the client fix (a round counts as sent only once the broker acknowledged its
update), b records round 2 as sent after waiting 60 s for the acknowledgement and its update
dies with the process: this test then fails.
"""

from __future__ import annotations

import signal

import pytest

from benchmarks.harness import check_ledger
from edge_client.outbox import PENDING_FILE
from shared.manifests import build_manifest, chunk_lengths

pytestmark = pytest.mark.integration

STARTUP = 300.0
STEP = 120.0
# Long enough for the old client code to give up waiting for the acknowledgement (60 s) and
# mark the round sent, so that this test fails on it instead of timing out earlier.
UNACKED = 90.0


def test_broker_killed_mid_transfer_and_mid_round(federation):
    fed = federation(["a", "b"], rounds={"rounds": 2}, training={"local_steps": 8})
    fed.serve()
    fed.join("a", "--keepalive", "600")
    fed.join("b", "--keepalive", "600")
    watch = ["coordinator", "a", "b"]

    # Mid-chunk-transfer.
    fed.wait(lambda: fed.chunks("a") >= 2, "a's first chunks", STARTUP, watch)
    fed.procs.signal("a", signal.SIGSTOP)
    held = fed.chunks("a")
    total = len(chunk_lengths(build_manifest(fed.run_dir / "tiers" / "L4" / "v1", name="", version=1, tier="L4")))
    assert held < total, f"a already had all {total} chunks: not mid-transfer"
    fed.broker.kill()
    fed.procs.kill("a")
    fed.broker.start()
    fed.join("a", "--keepalive", "600")
    fed.wait(lambda: fed.aggregated(1), "round 1 after the broker restart", STARTUP, watch)

    # Mid-round.
    frozen: set[str] = set()

    def freeze_on_progress() -> bool:
        for name, reached in (("b", lambda: fed.training("b", 2)), ("coordinator", lambda: fed.training("a", 2))):
            if name not in frozen and reached():
                if name == "coordinator":
                    fed.procs.kill(name)
                else:
                    fed.procs.signal(name, signal.SIGSTOP)
                frozen.add(name)
        return len(frozen) == 2

    fed.wait(freeze_on_progress, "a and b training round 2", STEP, ["a", "b"])
    fed.wait(lambda: 2 in fed.rounds_sent("a"), "the broker acknowledged a's round-2 update", STEP, ["a", "b"])
    accepted_before = fed.accepted()
    assert fed.accepted_in(2) == set()
    fed.broker.kill()
    fed.procs.signal("b", signal.SIGCONT)
    fed.wait(lambda: (fed.state_dir("b") / PENDING_FILE).exists() or 2 in fed.rounds_sent("b"),
             "b's round-2 update published while the broker is down", UNACKED, ["a", "b"])
    assert 2 not in fed.rounds_sent("b"), "b marked round 2 sent without the broker's acknowledgement"
    fed.procs.kill("b")
    fed.broker.start()
    fed.serve(resume=True)
    fed.join("b", "--keepalive", "600")
    fed.wait(lambda: fed.accepted_in(2) == {"a", "b"}, "both round-2 updates accepted", STEP, watch)

    report = fed.finish(STARTUP)
    ledger = check_ledger(fed.run_dir, accepted_before)
    assert ledger.accepted == {(r, c) for r in (1, 2) for c in "ab"}
    assert "re-sending the update the broker never acknowledged" in fed.procs.log("b")
    assert "round 2: the broker lost its state; sending our update again" in fed.procs.log("a")
    # The restarted a took the chunks it had verified before the crash from its cache.
    outcome = fed.outcome("a")
    assert (outcome["chunks_reused"], outcome["chunks_fetched"]) == (held, total - held)
    assert outcome["rounds_sent"] == fed.outcome("b")["rounds_sent"] == [1, 2]
    assert [r["reported"] for r in report["rounds"]] == [["a", "b"]] * 2
    assert "publishing the" in fed.procs.log("coordinator")  # its retained messages, after each crash
