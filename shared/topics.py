"""Every MQTT topic fedsoda uses is built (and parsed) here and nowhere else.

Tree (``v1`` is the protocol major, so two majors never read each other's messages)::

    fedsoda/v1/{run}/schedule            retained, coordinator -> all   (Schedule)
    fedsoda/v1/{run}/manifest/{tier}     retained, coordinator -> all   (Manifest)
    fedsoda/v1/{run}/adapter             retained, coordinator -> all   (GlobalAdapter)
    fedsoda/v1/{run}/hello/{client}      client -> coordinator          (Hello)
    fedsoda/v1/{run}/assign/{client}     coordinator -> client          (Assignment)
    fedsoda/v1/{run}/chunkreq/{client}   client -> coordinator          (ChunkRequest)
    fedsoda/v1/{run}/chunk/{client}      coordinator -> client          (Chunk)
    fedsoda/v1/{run}/update/{client}     client -> coordinator          (Update)
    fedsoda/v1/{run}/presence/{client}   retained + Last Will, client   (Presence)
    fedsoda/v1/{run}/nack/{client}       coordinator -> client          (Nack)

Per-client topics let a broker ACL pin each client to its own subtree. Ids (run, client,
tier) are 1-64 characters of ``[A-Za-z0-9._-]``: no MQTT wildcards or separators can hide
in them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from shared.errors import TopicError
from shared.protocol import PROTOCOL_MAJOR, MessageType

ROOT = "fedsoda"
VERSION_SEGMENT = f"v{PROTOCOL_MAJOR}"
_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")


class TopicKind(StrEnum):
    """The fourth topic level: what a topic carries."""

    SCHEDULE = "schedule"
    MANIFEST = "manifest"
    ADAPTER = "adapter"
    HELLO = "hello"
    ASSIGN = "assign"
    CHUNKREQ = "chunkreq"
    CHUNK = "chunk"
    UPDATE = "update"
    PRESENCE = "presence"
    NACK = "nack"


_MESSAGE_TYPE = {
    TopicKind.SCHEDULE: MessageType.SCHEDULE,
    TopicKind.MANIFEST: MessageType.MANIFEST,
    TopicKind.ADAPTER: MessageType.GLOBAL_ADAPTER,
    TopicKind.HELLO: MessageType.HELLO,
    TopicKind.ASSIGN: MessageType.ASSIGNMENT,
    TopicKind.CHUNKREQ: MessageType.CHUNK_REQUEST,
    TopicKind.CHUNK: MessageType.CHUNK,
    TopicKind.UPDATE: MessageType.UPDATE,
    TopicKind.PRESENCE: MessageType.PRESENCE,
    TopicKind.NACK: MessageType.NACK,
}

RUN_WIDE = frozenset({TopicKind.SCHEDULE, TopicKind.ADAPTER})
"""Kinds with no fifth level."""

PER_TIER = frozenset({TopicKind.MANIFEST})
"""Kinds whose fifth level is a tier name."""

CLIENT_PUBLISHED = frozenset({TopicKind.HELLO, TopicKind.CHUNKREQ, TopicKind.UPDATE, TopicKind.PRESENCE})
"""Per-client kinds the client itself publishes (their envelope sender must be that client)."""

RETAINED = frozenset({TopicKind.SCHEDULE, TopicKind.MANIFEST, TopicKind.ADAPTER, TopicKind.PRESENCE})
"""Kinds published with the retain flag."""


@dataclass(frozen=True)
class TopicInfo:
    """What :func:`parse` found in a topic.

    Attributes:
        run: Run id.
        kind: What the topic carries.
        client: Client id for per-client kinds, else None.
        tier: Tier for ``manifest`` topics, else None.
    """

    run: str
    kind: TopicKind
    client: str | None = None
    tier: str | None = None


def check_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid topic segment id, else raise.

    Args:
        value: A run, client or tier id.
        what: Its role, for the error message.

    Returns:
        ``value`` unchanged.

    Raises:
        TopicError: Empty, longer than 64, or outside ``[A-Za-z0-9._-]``.
    """
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise TopicError(f"{what} {value!r} must be 1-64 characters of letters, digits, '.', '_' or '-'")
    return value


def _base(run: str) -> str:
    return f"{ROOT}/{VERSION_SEGMENT}/{check_id(run, 'run id')}"


def run_prefix(run: str) -> str:
    """``fedsoda/v1/{run}``: the subtree of one run.

    Args:
        run: Run id.

    Returns:
        The prefix (no trailing slash).
    """
    return _base(run)


def schedule(run: str) -> str:
    """Topic of the retained :class:`~shared.protocol.Schedule`."""
    return f"{_base(run)}/{TopicKind.SCHEDULE}"


def adapter(run: str) -> str:
    """Topic of the retained :class:`~shared.protocol.GlobalAdapter`."""
    return f"{_base(run)}/{TopicKind.ADAPTER}"


def manifest(run: str, tier: str) -> str:
    """Topic of the retained :class:`~shared.protocol.Manifest` of one tier; ``tier="+"`` for all."""
    return f"{_base(run)}/{TopicKind.MANIFEST}/{_segment(tier, 'tier')}"


def per_client(run: str, kind: TopicKind, client: str) -> str:
    """Topic of a per-client kind for one client, or for all with ``client="+"``.

    Args:
        run: Run id.
        kind: A per-client kind (hello, assign, chunkreq, chunk, update, presence, nack).
        client: Client id, or ``"+"`` as a subscription wildcard.

    Returns:
        The topic (or filter).

    Raises:
        TopicError: ``kind`` is not per-client or an id is invalid.
    """
    kind = TopicKind(kind)
    if kind in RUN_WIDE or kind in PER_TIER:
        raise TopicError(f"{kind} topics are not per-client")
    return f"{_base(run)}/{kind}/{_segment(client, 'client id')}"


def hello(run: str, client: str) -> str:
    """Topic a client announces itself on."""
    return per_client(run, TopicKind.HELLO, client)


def assign(run: str, client: str) -> str:
    """Topic of a client's :class:`~shared.protocol.Assignment`."""
    return per_client(run, TopicKind.ASSIGN, client)


def chunkreq(run: str, client: str) -> str:
    """Topic a client requests chunks on."""
    return per_client(run, TopicKind.CHUNKREQ, client)


def chunk(run: str, client: str) -> str:
    """Topic a client receives chunks on."""
    return per_client(run, TopicKind.CHUNK, client)


def update(run: str, client: str) -> str:
    """Topic a client sends its :class:`~shared.protocol.Update` on."""
    return per_client(run, TopicKind.UPDATE, client)


def presence(run: str, client: str) -> str:
    """Retained presence (and Last Will) topic of a client."""
    return per_client(run, TopicKind.PRESENCE, client)


def nack(run: str, client: str) -> str:
    """Topic of the coordinator's refusals to a client."""
    return per_client(run, TopicKind.NACK, client)


def all_of(run: str, kind: TopicKind) -> str:
    """Subscription filter matching every topic of ``kind`` in ``run`` (``.../{kind}/+`` or the plain topic).

    Args:
        run: Run id.
        kind: Any kind.

    Returns:
        A topic filter.
    """
    kind = TopicKind(kind)
    if kind in RUN_WIDE:
        return f"{_base(run)}/{kind}"
    return f"{_base(run)}/{kind}/+"


def any_run_filter(kind: TopicKind, client: str = "+") -> str:
    """Filter matching topics of ``kind`` in every run (``fedsoda/v1/+/...``), for broker ACLs.

    Args:
        kind: Any kind.
        client: For per-client kinds, one client id or ``"+"`` for all; tiers are always ``"+"``.

    Returns:
        A topic filter; credentials issued once work for every run on the broker.
    """
    kind = TopicKind(kind)
    base = f"{ROOT}/{VERSION_SEGMENT}/+/{kind}"
    if kind in RUN_WIDE:
        return base
    if kind in PER_TIER:
        return f"{base}/+"
    return f"{base}/{_segment(client, 'client id')}"


def _segment(value: str, what: str) -> str:
    return value if value == "+" else check_id(value, what)


def client_of(topic: str) -> str | None:
    """The client segment of a topic if it parses as a fedsoda per-client topic, else None.

    Used to answer a message that failed to decode: the topic is all we can trust of it.
    """
    try:
        return parse(topic).client
    except TopicError:
        return None


def message_type_for(kind: TopicKind) -> MessageType:
    """The message type a topic kind carries.

    Args:
        kind: Topic kind.

    Returns:
        The matching :class:`MessageType`.
    """
    return _MESSAGE_TYPE[TopicKind(kind)]


def parse(topic: str, *, run: str | None = None) -> TopicInfo:
    """Split a fedsoda topic into its parts, refusing anything foreign.

    Args:
        topic: A concrete topic (no wildcards).
        run: If given, the topic must belong to this run.

    Returns:
        The parsed :class:`TopicInfo`.

    Raises:
        TopicError: Not under ``fedsoda/``, another protocol major, another run, an unknown
            kind, the wrong number of levels, or an invalid id.
    """
    parts = topic.split("/")
    if len(parts) < 4 or parts[0] != ROOT:
        raise TopicError(f"topic {topic!r} is not a fedsoda topic ({ROOT}/{VERSION_SEGMENT}/<run>/<kind>...)")
    if parts[1] != VERSION_SEGMENT:
        raise TopicError(f"topic {topic!r} is for protocol {parts[1]!r}; this build speaks {VERSION_SEGMENT}")
    run_id = check_id(parts[2], "run id")
    if run is not None and run_id != run:
        raise TopicError(f"topic {topic!r} belongs to run {run_id!r}, not {run!r}")
    try:
        kind = TopicKind(parts[3])
    except ValueError:
        raise TopicError(f"topic {topic!r} has unknown kind {parts[3]!r}") from None
    if kind in RUN_WIDE:
        if len(parts) != 4:
            raise TopicError(f"topic {topic!r}: {kind} topics have no further levels")
        return TopicInfo(run=run_id, kind=kind)
    if len(parts) != 5:
        raise TopicError(f"topic {topic!r}: {kind} topics have exactly one level after the kind")
    if kind in PER_TIER:
        return TopicInfo(run=run_id, kind=kind, tier=check_id(parts[4], "tier"))
    return TopicInfo(run=run_id, kind=kind, client=check_id(parts[4], "client id"))
