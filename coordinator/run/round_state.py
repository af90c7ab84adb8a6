"""The round machine's data: phases, the transition table and the state records.

:data:`TRANSITIONS` lists every phase change :func:`coordinator.run.rounds.step` may make;
:class:`RoundState` is everything the machine knows, frozen and JSON-serializable
(:meth:`RoundState.to_dict` / :meth:`RoundState.from_dict`), so a checkpoint is just the
state (``coordinator.run.checkpoint``). The machine's functions (``initial_state``,
``admission``, ``step``) are in :mod:`coordinator.run.rounds`; the events ``step`` takes and
the actions it returns are in :mod:`coordinator.run.round_events`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from coordinator.settings import RoundConfig
from shared.errors import RunStateError

STATE_FORMAT = 1
"""Version of the dict layout written by :meth:`RoundState.to_dict`."""


class Phase(StrEnum):
    """Where the run stands."""

    WAITING = "waiting_for_clients"
    PUBLISHING = "publishing"
    COLLECTING = "collecting"
    AGGREGATING = "aggregating"
    ALIGNING = "aligning"
    FINISHED = "finished"
    FAILED = "failed"


TERMINAL_PHASES = frozenset({Phase.FINISHED, Phase.FAILED})

TRANSITIONS: dict[tuple[Phase, Phase], str] = {
    (Phase.WAITING, Phase.PUBLISHING): "enough eligible clients online: select and publish a round",
    (Phase.WAITING, Phase.FAILED): "max_wait_s passed without enough clients, or Abort",
    (Phase.PUBLISHING, Phase.COLLECTING): "PublishDone for the round's schedule",
    (Phase.PUBLISHING, Phase.AGGREGATING): "PublishDone when the round is already complete "
    "(updates that raced the publish acknowledgement)",
    (Phase.PUBLISHING, Phase.FAILED): "Abort",
    (Phase.COLLECTING, Phase.AGGREGATING): "every live assigned client reported and quorum met, "
    "or deadline with quorum",
    (Phase.COLLECTING, Phase.FAILED): "deadline without quorum and no extension left, or Abort",
    (Phase.AGGREGATING, Phase.PUBLISHING): "AggregationDone, more rounds, enough clients online",
    (Phase.AGGREGATING, Phase.WAITING): "AggregationDone, more rounds, too few clients online",
    (Phase.AGGREGATING, Phase.ALIGNING): "AggregationDone and a re-alignment is due",
    (Phase.AGGREGATING, Phase.FINISHED): "AggregationDone for the last round",
    (Phase.AGGREGATING, Phase.FAILED): "Abort",
    (Phase.ALIGNING, Phase.PUBLISHING): "AlignmentDone, enough clients online",
    (Phase.ALIGNING, Phase.WAITING): "AlignmentDone, too few clients online",
    (Phase.ALIGNING, Phase.FAILED): "Abort",
}
"""Every allowed phase change, with when it happens. Anything else raises."""


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class ClientRecord:
    """What the coordinator knows about one client.

    Attributes:
        client_id: The client's id (its topic segment).
        tier: Sub-LLM tier assigned at hello ("" when refused).
        accepted: Whether the planner accepted the client at hello.
        num_examples: Examples the client declared at hello.
        online: Last known presence (hello sets it; Last Will clears it).
        missed: Rounds in a row it was assigned to and did not report in (hello and a late
            update reset it; see ``RoundConfig.max_missed``).
    """

    client_id: str
    tier: str
    accepted: bool
    num_examples: int
    online: bool
    missed: int = 0


@dataclass(frozen=True)
class RoundRecord:
    """One round's selection, progress and counters (the report reads these).

    Attributes:
        round: Round number (1-based).
        participants: Assigned clients as sorted ``(client_id, tier)`` pairs.
        quorum: Reports needed to close the round.
        started_at: Tick time when the round was selected.
        deadline: Current deadline (unix seconds); moves on extension.
        extensions: Extensions used so far.
        reported: Clients whose update was accepted, sorted.
        examples: Sum of ``num_examples`` over accepted updates.
        dropouts: Assigned clients that had not reported when the round closed.
        duplicates: Repeated updates for this round from a client already counted.
        late: Updates for this round that arrived after it closed.
        rejected: Updates refused by validation or from a client not assigned.
        closed_at: Tick time when collection stopped (None while open).
        outcome: ``"open"``, ``"closed"`` (aggregating), ``"aggregated"`` or ``"failed"``.
    """

    round: int
    participants: tuple[tuple[str, str], ...]
    quorum: int
    started_at: float
    deadline: float
    extensions: int = 0
    reported: tuple[str, ...] = ()
    examples: int = 0
    dropouts: int = 0
    duplicates: int = 0
    late: int = 0
    rejected: int = 0
    closed_at: float | None = None
    outcome: str = "open"

    @property
    def assigned(self) -> frozenset[str]:
        """The ids of the clients assigned to this round."""
        return frozenset(cid for cid, _ in self.participants)


@dataclass(frozen=True)
class RoundState:
    """Everything the round loop needs; serializes to plain JSON types.

    Attributes:
        config: The run's round config (checkpointed with the state so a resumed run keeps it).
        run_id: The run's id (topic segment).
        seed: Seed for client selection; round t uses ``random.Random(f"{seed}:{t}")``.
        phase: Current phase.
        round: Current (or last) round number; 0 before the first.
        now: Time of the latest Tick/Start (unix seconds).
        waiting_since: When the run last entered waiting_for_clients.
        adapter_round: Round of the newest global adapter (0 = the initial adapter).
        model_version: Sub-LLM version from the latest AlignmentDone (0 = pre-aligned).
        clients: Known clients sorted by id.
        records: One record per started round, oldest first.
        fail_reason: Why the run failed ("" otherwise).
    """

    config: RoundConfig
    run_id: str
    seed: int
    phase: Phase = Phase.WAITING
    round: int = 0
    now: float = 0.0
    waiting_since: float = 0.0
    adapter_round: int = 0
    model_version: int = 0
    clients: tuple[ClientRecord, ...] = ()
    records: tuple[RoundRecord, ...] = ()
    fail_reason: str = ""

    def client(self, client_id: str) -> ClientRecord | None:
        """Return the record of ``client_id``, or None if it never said hello."""
        for c in self.clients:
            if c.client_id == client_id:
                return c
        return None

    def record(self, round_: int) -> RoundRecord | None:
        """Return the record of round ``round_``, or None if it never started."""
        for r in self.records:
            if r.round == round_:
                return r
        return None

    @property
    def current(self) -> RoundRecord | None:
        """The record of the current round, or None before the first round."""
        return self.record(self.round)

    def eligible_online(self) -> list[str]:
        """Sorted ids of clients that were accepted at hello and are online."""
        return [c.client_id for c in self.clients if c.accepted and c.online]

    def awaited(self) -> set[str]:
        """Ids of the clients a round waits for: accepted, online, and not ``config.max_missed``
        rounds in a row without a report since they last showed life."""
        limit = self.config.max_missed
        return {c.client_id for c in self.clients if c.accepted and c.online and not (limit and c.missed >= limit)}

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict for JSON (see :meth:`from_dict`)."""
        d = dataclasses.asdict(self)
        d["phase"] = self.phase.value
        d["format"] = STATE_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoundState:
        """Rebuild a state written by :meth:`to_dict`.

        Args:
            d: The dict (as loaded from JSON: tuples became lists).

        Returns:
            The equal state.

        Raises:
            RunStateError: A field is missing or malformed, or the format is unknown.
        """
        try:
            if d.get("format") != STATE_FORMAT:
                raise RunStateError(
                    f"state format {d.get('format')!r} is not {STATE_FORMAT}: "
                    "this run directory was written by another fedsoda version"
                )
            records = tuple(
                RoundRecord(
                    **{
                        **r,
                        "participants": tuple((str(a), str(b)) for a, b in r["participants"]),
                        "reported": tuple(r["reported"]),
                    }
                )
                for r in d["records"]
            )
            return cls(
                config=RoundConfig(**d["config"]),
                run_id=d["run_id"],
                seed=d["seed"],
                phase=Phase(d["phase"]),
                round=d["round"],
                now=d["now"],
                waiting_since=d["waiting_since"],
                adapter_round=d["adapter_round"],
                model_version=d["model_version"],
                clients=tuple(ClientRecord(**c) for c in d["clients"]),
                records=records,
                fail_reason=d["fail_reason"],
            )
        except RunStateError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise RunStateError(f"corrupt round state ({type(exc).__name__}: {exc})") from exc
