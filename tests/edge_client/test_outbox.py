"""The edge client's outbox (edge_client.outbox): a round counts as sent only once the broker has
acknowledged its update, an unacknowledged update survives a restart, and the last update is
sent again when a broker that lost its state leaves the coordinator still waiting for it.

A stand-in transport records publishes and answers ``flush`` as told; the broker paths run
end to end in tests/faults/test_broker_faults.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_client.outbox import PENDING_FILE, STATE_FILE, Outbox
from shared import topics
from shared.errors import RunStateError
from shared.protocol import Schedule
from tests.edge_client.helpers import make_params

RUN, CLIENT = "run-1", "alice"


class FakeTransport:
    """Records publishes; ``flush`` says whether the broker acknowledged everything."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.acknowledged = False

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        assert qos == 1 and not retain
        self.published.append((topic, payload))

    def flush(self, timeout: float | None = None) -> bool:
        return self.acknowledged


def _schedule(round_num: int, participants=(CLIENT,), status: str = "running") -> Schedule:
    return Schedule(
        round=round_num,
        status=status,
        deadline=0.0,
        quorum=1,
        participants={c: "t4" for c in participants},
        training=make_params(),
        manifests={},
        adapter_round=round_num - 1,
    )


def _outbox(state_dir: Path, transport: FakeTransport, run_id: str = RUN) -> Outbox:
    return Outbox(state_dir, run_id, CLIENT, transport)  # type: ignore[arg-type]


def test_a_round_counts_as_sent_once_the_broker_acknowledged_it(tmp_path):
    transport = FakeTransport()
    outbox = _outbox(tmp_path, transport)
    assert not outbox.holds(0)
    outbox.send(0, b"update-0")
    assert transport.published == [(topics.update(RUN, CLIENT), b"update-0")]
    assert outbox.holds(0) and outbox.sent == [] and outbox.unacked == 0
    assert (tmp_path / PENDING_FILE).read_bytes() == b"update-0"
    assert outbox.check_acknowledged(timeout=0.0) is None
    transport.acknowledged = True
    assert outbox.check_acknowledged(timeout=0.0) == 0
    assert outbox.sent == [0] and outbox.unacked is None and not (tmp_path / PENDING_FILE).exists()
    assert outbox.check_acknowledged(timeout=0.0) is None  # nothing left to acknowledge
    record = json.loads((tmp_path / STATE_FILE).read_text())
    assert record == {"run_id": RUN, "client_id": CLIENT, "rounds_sent": [0], "unacked_round": None}
    assert _outbox(tmp_path, FakeTransport()).sent == [0]


def test_an_unacknowledged_update_is_sent_again_after_a_restart(tmp_path):
    _outbox(tmp_path, FakeTransport()).send(3, b"update-3")
    transport = FakeTransport()
    restarted = _outbox(tmp_path, transport)
    assert restarted.unacked == 3 and restarted.holds(3)
    assert restarted.resend_unacked() == 3
    assert transport.published == [(topics.update(RUN, CLIENT), b"update-3")]
    assert _outbox(tmp_path / "fresh", FakeTransport()).resend_unacked() is None


def test_records_of_another_run_a_lost_pending_file_and_a_corrupt_record(tmp_path):
    outbox = _outbox(tmp_path, FakeTransport())
    outbox.send(1, b"update-1")
    assert _outbox(tmp_path, FakeTransport(), run_id="run-2").unacked is None  # another run's rounds do not count
    (tmp_path / PENDING_FILE).unlink()
    reloaded = _outbox(tmp_path, FakeTransport())
    assert reloaded.unacked is None and not reloaded.holds(1)  # nothing left to re-send
    (tmp_path / STATE_FILE).write_text("{not json")
    with pytest.raises(RunStateError, match="corrupt"):
        _outbox(tmp_path, FakeTransport())


def test_the_last_update_is_sent_again_when_the_broker_lost_its_state(tmp_path):
    transport = FakeTransport()
    outbox = _outbox(tmp_path, transport)
    outbox.send(2, b"update-2")
    transport.acknowledged = True
    outbox.check_acknowledged(timeout=0.0)
    outbox.connection_up(session_present=True)
    assert not outbox.resend_if_still_awaited(_schedule(2))  # the broker kept our session
    outbox.connection_up(session_present=False)
    assert not outbox.resend_if_still_awaited(_schedule(3))  # the coordinator moved on
    assert not outbox.resend_if_still_awaited(_schedule(2, participants=("bob",)))
    assert not outbox.resend_if_still_awaited(_schedule(2, status="finished"))
    assert outbox.resend_if_still_awaited(_schedule(2))
    assert not outbox.resend_if_still_awaited(_schedule(2))  # once per loss
    assert transport.published == [(topics.update(RUN, CLIENT), b"update-2")] * 2
