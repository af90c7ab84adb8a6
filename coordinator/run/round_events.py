"""What goes into the round machine and what comes out of it.

Events (:data:`Event`) are everything that can happen to a run: the clock, client hellos and
presence, updates (with the verdict of content validation done outside), and the completion
of the work an action asked for. Actions (:data:`Action`) are what
:func:`coordinator.run.rounds.step` asks the server loop (``coordinator.run.server``) to do,
in order. All are frozen dataclasses of plain values, so tests compare them by equality.
"""

from __future__ import annotations

from dataclasses import dataclass

# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class Start:
    """The server started or resumed: re-emit whatever the current phase is waiting on."""

    now: float


@dataclass(frozen=True)
class Tick:
    """The clock moved to ``now`` (unix seconds); deadlines are checked here."""

    now: float


@dataclass(frozen=True)
class ClientHello:
    """A client said hello and the planner decided on it (implies the client is online)."""

    client_id: str
    tier: str
    accepted: bool
    num_examples: int


@dataclass(frozen=True)
class ClientOnline:
    """A client's presence says online (it is live again, even mid-round)."""

    client_id: str


@dataclass(frozen=True)
class ClientOffline:
    """A client's presence says offline, e.g. its Last Will: it no longer blocks closing."""

    client_id: str


@dataclass(frozen=True)
class UpdateReceived:
    """An update arrived; ``ok`` is the verdict of content validation done outside.

    Attributes:
        client_id: The sender (already checked against the topic).
        round: The round the update names.
        message_id: Envelope message id (Nacks refer to it).
        num_examples: The client's example count.
        ok: True when content validation passed and the update was persisted.
        code: Rejection code when not ok (see ``coordinator.run.inbound``).
        reason: Human-readable rejection reason when not ok.
    """

    client_id: str
    round: int
    message_id: str
    num_examples: int
    ok: bool = True
    code: str = ""
    reason: str = ""


@dataclass(frozen=True)
class PublishDone:
    """The schedule of ``round`` was published (broker acknowledged)."""

    round: int


@dataclass(frozen=True)
class AggregationDone:
    """The global adapter of ``round`` was aggregated and saved."""

    round: int


@dataclass(frozen=True)
class AlignmentDone:
    """Re-alignment finished and sub-LLM ``version`` was packaged and published."""

    version: int


@dataclass(frozen=True)
class Abort:
    """Stop the run as failed (operator interrupt, an aggregation or alignment error)."""

    reason: str


Event = (
    Start
    | Tick
    | ClientHello
    | ClientOnline
    | ClientOffline
    | UpdateReceived
    | PublishDone
    | AggregationDone
    | AlignmentDone
    | Abort
)


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class PersistCheckpoint:
    """Write the new state to the run directory before carrying out the other actions."""


@dataclass(frozen=True)
class PublishSchedule:
    """Publish (retained) a Schedule; the server adds training params and manifests.

    Attributes:
        round: The round the schedule is about (the next one while waiting).
        status: ``"waiting" | "running" | "aligning" | "finished" | "failed"``.
        deadline: Unix deadline (0.0 when no round is running).
        quorum: Reports needed (0 when no round is running).
        participants: Assigned clients as sorted ``(client_id, tier)`` pairs.
        adapter_round: Round of the global adapter clients must start from.
        model_version: Sub-LLM version the manifests must carry.
    """

    round: int
    status: str
    deadline: float
    quorum: int
    participants: tuple[tuple[str, str], ...]
    adapter_round: int
    model_version: int


@dataclass(frozen=True)
class SendNack:
    """Tell a client its update was not used."""

    client_id: str
    round: int
    ref_message_id: str
    code: str
    reason: str


@dataclass(frozen=True)
class RequestAggregation:
    """Aggregate the persisted updates of ``client_ids`` for ``round``, then send AggregationDone."""

    round: int
    client_ids: tuple[str, ...]


@dataclass(frozen=True)
class StartAlignment:
    """Re-align the sub-LLMs with the global adapter of ``round``, then send AlignmentDone."""

    round: int


@dataclass(frozen=True)
class Finish:
    """All rounds are aggregated; export the adapter of ``adapter_round`` and stop."""

    adapter_round: int


@dataclass(frozen=True)
class Fail:
    """The run failed; stop with ``reason``."""

    reason: str


Action = (
    PersistCheckpoint
    | PublishSchedule
    | SendNack
    | RequestAggregation
    | StartAlignment
    | Finish
    | Fail
)
