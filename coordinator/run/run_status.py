"""Where a run stands, read from its run directory while the coordinator may be writing it.

``fedsoda-coordinator status RUN_DIR`` is built from three functions: :func:`read_status`
reads a run directory into a :class:`RunStatus`, :func:`status_table` draws it as a rich
table and :func:`status_dict` turns it into the ``--json`` object; :func:`watch_status`
redraws it until the run ends.

Nothing here talks to the coordinator: the status is what its files say. Each file is read
once, and every file the coordinator writes is replaced atomically (see
:mod:`coordinator.run.checkpoint`), so a reader sees a whole file from some moment, never
half of one. state.json is read first and the updates after it: the coordinator persists an
update before its state counts it, so every update the state counts is on disk by then, and
an update already on disk but not yet counted shows as sent too.

The state's clock (``RoundState.now``) is the coordinator's time at its latest checkpoint,
which it writes whenever anything but the clock changes; a deadline that passes always
changes the state (the round closes, is extended or fails), so the status needs no clock of
its own.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.run.checkpoint import RunDir
from coordinator.run.reports import (
    GIB,
    MIB,
    per_client_rounds,
    round_record_dict,
    update_entries,
)
from coordinator.run.round_state import (
    TERMINAL_PHASES,
    ClientRecord,
    Phase,
    RoundRecord,
)
from shared.errors import RunStateError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


class ClientState(StrEnum):
    """What a client is doing in the current round."""

    TRAINING = "training"
    """Assigned to the round, no update yet, and the round still collecting before its deadline."""
    SENT = "sent"
    """Its update for the round is persisted."""
    LATE = "late"
    """Assigned, online, no update, and the deadline passed or the round stopped collecting."""
    OFFLINE = "offline"
    """Its presence is lost (and it has no update for the round)."""
    IDLE = "idle"
    """Online but not selected for the round (or no round has started)."""


@dataclass(frozen=True)
class ClientStatus:
    """One client's row.

    Attributes:
        client_id: The client's id.
        tier: Sub-LLM tier assigned at hello ("" when refused).
        accepted: Whether the planner accepted it at hello.
        online: Its last known presence.
        state: What it is doing in the current round.
        rounds_sent: Rounds with a persisted update of it.
        bytes_sent: Bytes it published so far, as of its latest persisted update.
        bytes_received: Bytes it received so far, as of its latest persisted update.
        peak_rss_bytes: Highest peak resident memory over its updates' resource reports.
        peak_gpu_bytes: Highest peak CUDA memory over them (0 on CPU).
    """

    client_id: str
    tier: str
    accepted: bool
    online: bool
    state: ClientState
    rounds_sent: int
    bytes_sent: int
    bytes_received: int
    peak_rss_bytes: int
    peak_gpu_bytes: int


@dataclass(frozen=True)
class RunStatus:
    """A run directory's status at one moment.

    Attributes:
        run_dir: The run directory.
        run_id: The run's id.
        phase: The round machine's phase.
        fail_reason: Why the run failed ("" otherwise).
        round: Current (or last) round; 0 before the first.
        rounds: Rounds the run is configured for.
        model_version: Sub-LLM version (0 = pre-aligned).
        adapter_round: Round of the newest global adapter (0 = the initial one).
        now: The coordinator's clock at its latest checkpoint (unix seconds).
        current: The current round's record, or None before the first round.
        clients: One row per client that said hello, sorted by id.
    """

    run_dir: Path
    run_id: str
    phase: Phase
    fail_reason: str
    round: int
    rounds: int
    model_version: int
    adapter_round: int
    now: float
    current: RoundRecord | None
    clients: tuple[ClientStatus, ...]

    @property
    def terminal(self) -> bool:
        """Whether the run has ended (finished or failed): nothing in it will change."""
        return self.phase in TERMINAL_PHASES


def read_status(path: str | os.PathLike[str]) -> RunStatus:
    """Read a run directory's status (the run may be going on).

    Args:
        path: The run directory.

    Returns:
        The status.

    Raises:
        RunStateError: ``path`` is no folder, holds no state.json, or its files are corrupt.
        ConfigError: state.json holds a round config that is not valid.
    """
    run_dir = RunDir(path)
    # Checked here, not left to load_state: its message is worded for `serve --resume`.
    # state.json is never removed once written, so checking first opens no race.
    if not run_dir.path.is_dir():
        raise RunStateError(f"{run_dir.path} is not a run directory: no such folder")
    if not run_dir.state_path.is_file():
        raise RunStateError(f"{run_dir.path} is not a run directory: it has no {run_dir.state_path.name}")
    try:
        state = run_dir.load_state()
    except OSError as exc:  # e.g. unreadable; a missing file was checked above
        raise RunStateError(f"cannot read {run_dir.state_path}: {exc}") from exc
    updates = update_entries(run_dir, [rec.round for rec in state.records])
    rec = state.current
    sent = (set(rec.reported) | {u["client_id"] for u in updates if u["round"] == rec.round}) if rec else set()
    rows = per_client_rounds({"updates": updates})
    clients = tuple(
        _client_status(client, _client_state(client, rec, sent, state.now), [r for r in rows if r["client_id"] == client.client_id])
        for client in state.clients
    )
    return RunStatus(
        run_dir=run_dir.path,
        run_id=state.run_id,
        phase=state.phase,
        fail_reason=state.fail_reason,
        round=state.round,
        rounds=state.config.rounds,
        model_version=state.model_version,
        adapter_round=state.adapter_round,
        now=state.now,
        current=rec,
        clients=clients,
    )


def _client_state(client: ClientRecord, rec: RoundRecord | None, sent: set[str], now: float) -> ClientState:
    if client.client_id in sent:
        return ClientState.SENT  # persisted: true whatever its presence is now
    if not client.online:
        return ClientState.OFFLINE
    if rec is None or client.client_id not in rec.assigned:
        return ClientState.IDLE
    # A round that stopped collecting takes no more updates, so a client that missed it is
    # late even when the round closed early (every live client had reported while it was away).
    if now >= rec.deadline or rec.outcome != "open":
        return ClientState.LATE
    return ClientState.TRAINING


def _client_status(client: ClientRecord, state: ClientState, rows: list[dict[str, Any]]) -> ClientStatus:
    # Clients report cumulative byte counters; the per-round differences add up to the latest.
    return ClientStatus(
        client_id=client.client_id,
        tier=client.tier,
        accepted=client.accepted,
        online=client.online,
        state=state,
        rounds_sent=len(rows),
        bytes_sent=sum(r["bytes_up"] for r in rows),
        bytes_received=sum(r["bytes_down"] for r in rows),
        peak_rss_bytes=max((int(r["peak_rss_bytes"]) for r in rows), default=0),
        peak_gpu_bytes=max((int(r["peak_gpu_bytes"]) for r in rows), default=0),
    )


def status_dict(status: RunStatus) -> dict[str, Any]:
    """The status as plain JSON types (``status --json``).

    Keys: ``run_dir``, ``run_id``, ``phase``, ``terminal`` (finished or failed),
    ``fail_reason``, ``round``, ``rounds``, ``model_version``, ``adapter_round``, ``now``
    (the coordinator's clock at its latest checkpoint, unix seconds), ``current_round`` (the
    round record as in report.json's ``rounds``, or null before the first round) and
    ``clients``: client id -> ``tier``, ``accepted``, ``online``, ``state`` (training, sent,
    late, offline or idle), ``rounds_sent``, ``bytes_sent``, ``bytes_received``,
    ``peak_rss_bytes``, ``peak_gpu_bytes``.

    Args:
        status: A status from :func:`read_status`.

    Returns:
        The dict.
    """
    clients = {}
    for c in status.clients:
        row = dataclasses.asdict(c)
        del row["client_id"]
        row["state"] = c.state.value
        clients[c.client_id] = row
    return {
        "run_dir": str(status.run_dir),
        "run_id": status.run_id,
        "phase": status.phase.value,
        "terminal": status.terminal,
        "fail_reason": status.fail_reason,
        "round": status.round,
        "rounds": status.rounds,
        "model_version": status.model_version,
        "adapter_round": status.adapter_round,
        "now": status.now,
        "current_round": round_record_dict(status.current) if status.current else None,
        "clients": clients,
    }


_STATE_STYLE = {
    ClientState.TRAINING: "cyan",
    ClientState.SENT: "green",
    ClientState.LATE: "yellow",
    ClientState.OFFLINE: "red",
    ClientState.IDLE: "dim",
}


def status_table(status: RunStatus) -> Table:
    """The status as a rich table: the run in its title, the round in its caption, a row per client.

    Args:
        status: A status from :func:`read_status`.

    Returns:
        The table.
    """
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    title = (
        f"run {escape(status.run_id)}: {status.phase.value}, round {status.round}/{status.rounds}, "
        f"model v{status.model_version}"
    )
    table = Table(title=title, caption=_round_caption(status), box=box.SIMPLE_HEAD)
    for col in ("client", "tier", "accepted", "online", "state", "rounds", "MiB down", "MiB up", "peak GiB", "GPU GiB"):
        table.add_column(col, justify="right" if col in ("rounds", "MiB down", "MiB up", "peak GiB", "GPU GiB") else "left")
    for c in status.clients:
        table.add_row(
            escape(c.client_id), escape(c.tier) or "-", "yes" if c.accepted else "[red]refused[/]",
            "online" if c.online else "[red]offline[/]", f"[{_STATE_STYLE[c.state]}]{c.state.value}[/]",
            str(c.rounds_sent), f"{c.bytes_received / MIB:.1f}", f"{c.bytes_sent / MIB:.2f}",
            f"{c.peak_rss_bytes / GIB:.2f}", f"{c.peak_gpu_bytes / GIB:.2f}",
        )
    return table


def _round_caption(status: RunStatus) -> str:
    from rich.markup import escape

    lines = []
    rec = status.current
    if rec is None:
        lines.append("no round started yet")
    else:
        sent = sum(1 for c in status.clients if c.state is ClientState.SENT and c.client_id in rec.assigned)
        line = f"round {rec.round} {rec.outcome}: {sent} of {len(rec.participants)} sent, quorum {rec.quorum}"
        line += f", deadline {_clock(rec.deadline)}"
        if rec.extensions:
            line += f" ({rec.extensions} extension{'s' if rec.extensions > 1 else ''})"
        lines.append(line)
    lines.append(f"state as of {_clock(status.now)}")
    if status.fail_reason:
        lines.append(f"[red]failed: {escape(status.fail_reason)}[/]")
    return "\n".join(lines)


def _clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def watch_status(
    path: str | os.PathLike[str],
    *,
    interval: float,
    console: Console,
    sleep: Callable[[float], None] = time.sleep,
) -> RunStatus:
    """Redraw the status live every ``interval`` seconds until the run ends or Ctrl-C.

    The live view is transient: the caller prints the returned status once, so the final
    view appears once whether or not the console is a terminal.

    Args:
        path: The run directory.
        interval: Seconds between reads (> 0).
        console: Where to draw.
        sleep: Waits between reads (injectable so a test can change the run in between).

    Returns:
        The last status read.

    Raises:
        RunStateError: The run directory is not one, or became unreadable.
    """
    from rich.live import Live

    status = read_status(path)
    try:
        with Live(status_table(status), console=console, transient=True, auto_refresh=False) as live:
            while not status.terminal:
                sleep(interval)
                status = read_status(path)
                live.update(status_table(status), refresh=True)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how a user stops watching a run that goes on; not an error
    return status
