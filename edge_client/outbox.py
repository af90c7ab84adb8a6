"""The edge client's outbox: the rounds it has sent, and the update the broker has not acknowledged.

A round counts as sent only once the broker has acknowledged its update. Until then the
encoded update waits on disk (:data:`PENDING_FILE`, named by ``unacked_round`` in
:data:`STATE_FILE`), so a client that crashes in between sends it again after a restart
instead of losing it, and does not train the round twice. Sending twice is safe: the
coordinator keeps the first copy it accepts.

A broker that crashed comes back without sessions and may acknowledge an update, then drop
it because the coordinator has not subscribed again yet; :meth:`Outbox.resend_if_still_awaited`
sends the last update again when the coordinator republishes the round it is still waiting on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from shared import topics
from shared.errors import RunStateError

if TYPE_CHECKING:
    from shared.protocol import Schedule
    from shared.transport import MqttTransport

STATE_FILE = "client.json"
"""The sent-round record in the state folder: run id, client id, ``rounds_sent``, ``unacked_round``."""
PENDING_FILE = "update-unacked.msgpack"
"""The encoded update of the round named ``unacked_round`` in client.json, kept until acknowledged."""


class Outbox:
    """Publishes updates and records, in the state folder, which rounds the broker has acknowledged.

    Args:
        state_dir: The client's state folder (exists).
        run_id: The run joined; a record of another run in the folder is ignored.
        client_id: This client's id.
        transport: Publishes the updates and reports the broker's acknowledgements.

    Raises:
        RunStateError: The record in ``state_dir`` is corrupt.
    """

    def __init__(self, state_dir: Path, run_id: str, client_id: str, transport: MqttTransport) -> None:
        self.state_dir = state_dir
        self.run_id = run_id
        self.client_id = client_id
        self.transport = transport
        self.sent, self.unacked = self._load()
        self._last_update: tuple[int, bytes] | None = None  # (round, encoded update) sent last
        self._broker_lost_state = False  # a reconnect found our session gone since the last update

    def holds(self, round_num: int) -> bool:
        """Whether an update of this round was sent already (acknowledged or not)."""
        return round_num in self.sent or round_num == self.unacked

    def _load(self) -> tuple[list[int], int | None]:
        """Rounds whose update the broker acknowledged, and the round of an unacknowledged one."""
        path = self.state_dir / STATE_FILE
        if not path.is_file():
            return [], None
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise RunStateError(f"{path} is corrupt ({exc.msg}); delete it to start this client afresh") from exc
        if data.get("run_id") != self.run_id:
            return [], None  # another run used this folder: its chunks stay useful, its rounds do not
        unacked = data.get("unacked_round")
        if unacked is not None and not (self.state_dir / PENDING_FILE).is_file():
            unacked = None
        return [int(r) for r in data.get("rounds_sent", [])], None if unacked is None else int(unacked)

    def _save(self) -> None:
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"run_id": self.run_id, "client_id": self.client_id, "rounds_sent": self.sent,
                                   "unacked_round": self.unacked}))
        tmp.replace(path)

    def _publish(self, payload: bytes) -> None:
        self.transport.publish(topics.update(self.run_id, self.client_id), payload, qos=1)

    def send(self, round_num: int, payload: bytes) -> None:
        """Publish an encoded update, saved first so that a restart can send it again.

        A QoS 1 publish made while the broker is unreachable waits in this process's memory:
        were the round marked sent now, a crash before the broker's acknowledgement would lose
        the update.

        Args:
            round_num: The update's round.
            payload: The encoded update message.
        """
        pending = self.state_dir / PENDING_FILE
        pending.with_suffix(".tmp").write_bytes(payload)
        pending.with_suffix(".tmp").replace(pending)
        self.unacked = round_num
        self._save()
        self._last_update = (round_num, payload)
        self._broker_lost_state = False  # only a loss after this publish can drop it
        self._publish(payload)

    def resend_unacked(self) -> int | None:
        """Send again the update a previous run of this client left unacknowledged.

        Returns:
            Its round, or ``None`` when there was none.
        """
        if self.unacked is None:
            return None
        self._last_update = (self.unacked, (self.state_dir / PENDING_FILE).read_bytes())
        self._publish(self._last_update[1])
        return self.unacked

    def connection_up(self, session_present: bool) -> None:
        """Note a (re)connection: without our session the broker may have lost what it had acknowledged."""
        self._broker_lost_state |= not session_present

    def resend_if_still_awaited(self, schedule: Schedule | None) -> bool:
        """After the broker lost its state, send our update again when the coordinator republishes its round.

        The coordinator republishes its schedule once it has subscribed again; the round still
        running with this client among its participants means it may still wait for us.

        Args:
            schedule: The schedule just received.

        Returns:
            Whether the last update was sent again.
        """
        if (not self._broker_lost_state or schedule is None or self._last_update is None
                or self.unacked is not None or schedule.status != "running"
                or schedule.round != self._last_update[0] or self.client_id not in schedule.participants):
            return False
        self._broker_lost_state = False
        self._publish(self._last_update[1])
        return True

    def check_acknowledged(self, timeout: float) -> int | None:
        """Mark the unacknowledged round sent once the broker has acknowledged everything we published.

        Args:
            timeout: Seconds to wait for the acknowledgement (0: just look).

        Returns:
            The round now marked sent, or ``None``.
        """
        if self.unacked is None or not self.transport.flush(timeout=timeout):
            return None
        acknowledged, self.unacked = self.unacked, None
        self.sent.append(acknowledged)
        self._save()
        (self.state_dir / PENDING_FILE).unlink(missing_ok=True)
        return acknowledged
