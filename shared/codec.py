"""Envelope <-> bytes: msgpack with strict, cheap-first validation.

Decoding untrusted bytes checks, in this order, so a hostile message costs little:

1. the size cap, before anything is unpacked (:class:`PayloadTooLargeError`);
2. where the caller pinned a key (a client, on the coordinator's topics), the signature, on
   the raw bytes before msgpack reads any of them (:class:`SignatureError`; see
   :mod:`shared.signing`);
3. msgpack limits on string, binary, array and map lengths (never more than the message's
   own size could hold), no ext types, str map keys, at most 1024 nesting levels
   (:class:`MalformedMessageError` for truncated or garbage bytes);
4. the envelope's protocol major version (:class:`VersionError`), before any body field,
   so a newer peer's message fails on what matters;
5. the message type (:class:`UnknownMessageTypeError`);
6. every required field and type, recursively through the body dataclass
   (:class:`MissingFieldError`, :class:`FieldTypeError`), with ``Any`` fields capped in
   nesting depth, and tensors checked (dtype allow-list, element count x item size ==
   byte length: :class:`TensorError`).

Unknown extra fields are dropped with one warning per (type, field) per process, so a
newer minor version keeps working with older peers.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from typing import Any

import msgpack

from shared import topics
from shared.errors import (
    FieldTypeError,
    MalformedMessageError,
    MissingFieldError,
    PayloadTooLargeError,
    ProtocolError,
    TopicError,
    UnknownMessageTypeError,
    VersionError,
)
from shared.protocol import (
    BODY_TYPES,
    MAX_MESSAGE_BYTES,
    MESSAGE_TYPES,
    PROTOCOL_MAJOR,
    PROTOCOL_VERSION,
    Envelope,
    MessageType,
)
from shared.signing import SIGNATURE_FIELD, SigningKey, VerifyKey
from shared.typed import (
    DEFAULT_MAX_DEPTH,
    INVALID,
    Problem,
    field_hints,
    from_plain,
    short_repr,
    to_plain,
)

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = MAX_MESSAGE_BYTES
"""Default size cap for :func:`decode`: the protocol's hard cap."""

MAX_ARRAY_LEN = 1 << 16
"""Longest list a message may hold (the chunk list of a 256 GiB file at 4 MiB chunks).

msgpack reserves a list's declared length before reading its items, at every nesting level
at once, so this times 8 bytes times the nesting depth bounds what a hostile message can
make it reserve."""

MAX_MAP_LEN = 1 << 16
"""Largest map a message may hold (adapter dicts have hundreds of keys)."""

MAX_STR_LEN = 1 << 20
"""Longest string a message may hold."""

_SPLICE_MIN_BYTES = 64 * 1024

_TYPE_VALUES = tuple(t.value for t in MessageType)
# The signature is checked on the raw bytes before unpacking, by whoever pinned a key
# (shared.signing); once unpacked it is a known field with nothing left to check.
_HEADER_FIELDS = ("version", "type", "run", "round", "sender", "message_id", "timestamp", "body", SIGNATURE_FIELD)
_HEADER_HINTS = {k: v for k, v in field_hints(Envelope).items() if k not in ("type", "body")}

_MAX_WARNED_UNKNOWN = 256
_warned_unknown: set[tuple[str, str]] = set()
_warned_lock = threading.Lock()


def encode(
    msg_type: MessageType,
    body: Any,
    *,
    run: str,
    round: int,
    sender: str,
    message_id: str | None = None,
    timestamp: float | None = None,
    version: str = PROTOCOL_VERSION,
    signer: SigningKey | None = None,
) -> bytes:
    """Build one envelope and pack it (and sign it, given a key).

    Args:
        msg_type: The message type; must match ``body``'s class.
        body: Instance of ``BODY_TYPES[msg_type]``.
        run: Run id.
        round: Round number, -1 where none applies.
        sender: Sender id (client id or coordinator id).
        message_id: uuid hex; a fresh uuid4 when omitted (fix it only for golden samples).
        timestamp: Unix time; now when omitted.
        version: The protocol version in the header: ours, except to re-pack a received
            envelope as it was (:func:`encode_envelope`) or to play an older peer in tests.
        signer: The coordinator's key: the envelope gets a ``signature`` header field
            (:mod:`shared.signing`). None for clients, whose messages go unsigned.

    Returns:
        The msgpack bytes.

    Raises:
        FieldTypeError: ``body`` is not the dataclass ``msg_type`` carries.
        PayloadTooLargeError: The encoded message exceeds the protocol's hard cap.
    """
    msg_type = MessageType(msg_type)
    expected = BODY_TYPES[msg_type]
    if type(body) is not expected:
        raise FieldTypeError(
            f"a {msg_type.value} message carries a {expected.__name__} body, got {type(body).__name__}"
        )
    envelope = {
        "version": version,
        "type": msg_type.value,
        "run": run,
        "round": int(round),
        "sender": sender,
        "message_id": message_id or uuid.uuid4().hex,
        "timestamp": time.time() if timestamp is None else float(timestamp),
    }
    parts = _pack(envelope, body)
    if signer is not None:
        parts = signer.sign_packed(parts)
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    if len(data) > MAX_MESSAGE_BYTES:
        raise PayloadTooLargeError(
            f"{msg_type.value} message is {len(data)} bytes, over the protocol cap of {MAX_MESSAGE_BYTES}; "
            "send large data as a chunked blob (shared.blob_server, shared.blob_fetcher)"
        )
    return data


def encode_envelope(envelope: Envelope) -> bytes:
    """Pack an already built :class:`Envelope` (its header is kept as is).

    Args:
        envelope: The envelope; ``body`` must match ``type``.

    Returns:
        The msgpack bytes.
    """
    return encode(
        envelope.type,
        envelope.body,
        run=envelope.run,
        round=envelope.round,
        sender=envelope.sender,
        message_id=envelope.message_id,
        timestamp=envelope.timestamp,
        version=envelope.version,
    )


def _pack(header: dict[str, Any], body: Any) -> list[bytes]:
    """msgpack the envelope as pieces to join, copying each large bytes value once instead of twice.

    msgpack copies a value into its buffer and the buffer into the result. Large values
    (chunk data, tensors) are packed as small unique placeholders instead, and spliced in
    with the single join the caller does (after signing the pieces, if it signs), which
    makes encoding run at memory-copy speed.
    """
    token = os.urandom(12)
    large: list[bytes] = []

    def placeholder(value: bytes) -> bytes:
        if len(value) < _SPLICE_MIN_BYTES:
            return value
        large.append(value)
        return token + len(large).to_bytes(4, "big")

    plain = dict(header, body=to_plain(body, placeholder))
    packed = msgpack.packb(plain, use_bin_type=True)
    if not large:
        return [packed]
    # Each placeholder is packed as bin8 of 16 bytes: 0xc4 0x10 token index.
    spots = sorted((packed.index(b"\xc4\x10" + token + i.to_bytes(4, "big")), i) for i in range(1, len(large) + 1))
    parts: list[bytes] = []
    pos = 0
    for at, i in spots:
        value = large[i - 1]
        parts += (packed[pos:at], b"\xc6" + len(value).to_bytes(4, "big"), value)  # bin32 header + data
        pos = at + 18
    parts.append(packed[pos:])
    return parts


def decode(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_BYTES, verify_key: VerifyKey | None = None
) -> Envelope:
    """Unpack and validate one envelope.

    Args:
        data: The received bytes.
        max_bytes: Size cap, checked before unpacking.
        verify_key: The pinned coordinator key: the envelope must be signed by it, checked
            right after the size cap. None accepts signed and unsigned envelopes alike
            without checking (the coordinator reading what clients send).

    Returns:
        The envelope with a typed body.

    Raises:
        PayloadTooLargeError: ``data`` is longer than ``max_bytes``.
        SignatureError: With ``verify_key``: unsigned, or not signed by that key.
        MalformedMessageError: Not a msgpack map, truncated, trailing bytes, or over a msgpack limit.
        VersionError: A protocol major version other than ours (or an unparsable version).
        UnknownMessageTypeError: A type this build does not know.
        MissingFieldError: A required header or body field is absent.
        FieldTypeError: A field has the wrong type, a disallowed value, or nests too deeply.
        TensorError: A tensor payload is inconsistent.
    """
    size = len(data)
    if size > max_bytes:
        raise PayloadTooLargeError(f"message is {size} bytes, over the cap of {max_bytes}; refusing to unpack it")
    if verify_key is not None:
        verify_key.verify(data)
    try:
        # msgpack allocates a container's declared length before reading its items, so a few
        # bytes could claim millions of slots at each of many nesting levels. Every item takes
        # at least one byte (a map entry two), which bounds honest lengths by the size.
        raw = msgpack.unpackb(
            data,
            raw=False,
            use_list=True,
            strict_map_key=True,
            max_bin_len=size,
            max_str_len=min(MAX_STR_LEN, size),
            max_array_len=min(MAX_ARRAY_LEN, size),
            max_map_len=min(MAX_MAP_LEN, size // 2),
            max_ext_len=0,
        )
    except msgpack.ExtraData as exc:
        raise MalformedMessageError(f"message has {len(exc.extra)} trailing bytes after the envelope") from exc
    except msgpack.StackError as exc:
        raise MalformedMessageError("message nests containers deeper than msgpack's limit of 1024 levels") from exc
    except msgpack.FormatError as exc:
        raise MalformedMessageError(
            "message is not a valid msgpack envelope (it holds a type byte msgpack does not define, e.g. 0xc1)"
        ) from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack says "incomplete input" for truncated bytes and names the exceeded limit otherwise.
        raise MalformedMessageError(f"message is not a valid msgpack envelope ({exc})") from exc
    if not isinstance(raw, dict):
        raise MalformedMessageError(f"message is a msgpack {type(raw).__name__}, expected a map (the envelope)")
    return _envelope_from_plain(raw)


def _envelope_from_plain(raw: dict[str, Any]) -> Envelope:
    version = raw.get("version")
    if version is None:
        raise MissingFieldError("envelope field 'version' is missing")
    _check_version(version)
    type_value = raw.get("type")
    if type_value is None:
        raise MissingFieldError("envelope field 'type' is missing")
    # Look the value up ourselves: MessageType(value) puts repr(value) in its error, and the
    # repr of a list nested a thousand levels deep overflows the stack.
    if not isinstance(type_value, str) or type_value not in _TYPE_VALUES:
        raise UnknownMessageTypeError(
            f"unknown message type {short_repr(type_value)}; known: {', '.join(_TYPE_VALUES)}"
        )
    msg_type = MessageType(type_value)
    problems: list[Problem] = []
    header: dict[str, Any] = {}
    for name, hint in _HEADER_HINTS.items():
        if name not in raw:
            problems.append(Problem("missing", name, "required envelope field is missing"))
        else:
            header[name] = from_plain(hint, raw[name], problems, name)
    if "body" not in raw:
        problems.append(Problem("missing", "body", "required envelope field is missing"))
        body = INVALID
    else:
        body = from_plain(BODY_TYPES[msg_type], raw["body"], problems, "body", max_depth=DEFAULT_MAX_DEPTH)
    for key in raw:
        if key not in _HEADER_FIELDS:
            problems.append(Problem("unknown", key, "unknown envelope field"))
    _raise_for(problems, msg_type)
    return Envelope(type=msg_type, body=body, **header)


_VERSION_RE = re.compile(r"(\d{1,9})\.(\d{1,9})", re.ASCII)


def _check_version(version: Any) -> None:
    # ASCII digits only, and few of them: int() of thousands of digits raises ValueError.
    match = _VERSION_RE.fullmatch(version) if isinstance(version, str) else None
    if match is None:
        raise VersionError(f"envelope version must be a 'major.minor' string, got {short_repr(version)}")
    major = int(match.group(1))
    if major != PROTOCOL_MAJOR:
        newer = "newer" if major > PROTOCOL_MAJOR else "older"
        raise VersionError(
            f"message speaks protocol {version} ({newer} major); this build speaks {PROTOCOL_VERSION}: "
            "upgrade the older side so both run the same major version"
        )


def _raise_for(problems: list[Problem], msg_type: MessageType) -> None:
    """Warn once about unknown fields; raise the first real problem as its typed error."""
    for p in problems:
        if p.kind == "unknown":
            _warn_unknown(msg_type, p.path)
    for p in problems:
        if p.kind == "missing":
            raise MissingFieldError(f"{msg_type.value} message: {p}")
        if p.kind == "value":
            if isinstance(p.error, ProtocolError):
                raise type(p.error)(f"{msg_type.value} message: {p}") from p.error
            raise FieldTypeError(f"{msg_type.value} message: {p}") from p.error
        if p.kind == "type":
            raise FieldTypeError(f"{msg_type.value} message: {p}")


def _warn_unknown(msg_type: MessageType, path: str) -> None:
    key = (msg_type.value, path)
    with _warned_lock:
        # Field names come from the sender: cap what we remember so they cannot grow it for ever.
        if key in _warned_unknown or len(_warned_unknown) >= _MAX_WARNED_UNKNOWN:
            return
        _warned_unknown.add(key)
    log.warning(
        "dropping unknown field %s of %s messages (a newer peer?); warned once per field", short_repr(path), msg_type.value
    )


def decode_message(
    topic: str,
    payload: bytes,
    *,
    run: str,
    max_bytes: int = DEFAULT_MAX_BYTES,
    verify_key: VerifyKey | None = None,
) -> tuple[topics.TopicInfo, Envelope]:
    """Parse a topic and decode its payload, checking that they agree.

    Beyond :func:`decode`: the topic must be one of ours for ``run``, the envelope's run must
    be ``run``, its type must be the one the topic carries, and on a per-client topic that
    the client publishes (hello, chunkreq, update, presence) the sender must be that client.

    Args:
        topic: The MQTT topic the payload arrived on.
        payload: The payload bytes.
        run: The run this process serves.
        max_bytes: Size cap, checked before unpacking.
        verify_key: The pinned coordinator key (see :func:`decode`); a client passes it for
            every coordinator topic.

    Returns:
        (parsed topic, envelope).

    Raises:
        TopicError: Foreign topic or a topic/envelope disagreement.
        SignatureError: With ``verify_key``: unsigned, or not signed by that key.
        ProtocolError: Any :func:`decode` error.
    """
    info = topics.parse(topic, run=run)
    envelope = decode(payload, max_bytes=max_bytes, verify_key=verify_key)
    if envelope.run != run:
        raise TopicError(f"envelope names run {short_repr(envelope.run)} but arrived on {topic!r} of run {run!r}")
    expected = topics.message_type_for(info.kind)
    if envelope.type is not expected:
        raise TopicError(f"topic {topic!r} carries {expected.value} messages, got {envelope.type.value}")
    if info.kind in topics.CLIENT_PUBLISHED and envelope.sender != info.client:
        raise TopicError(f"message on {topic!r} claims sender {short_repr(envelope.sender)}, not the topic's client")
    return info, envelope


def message_type_of(body: Any) -> MessageType:
    """The message type whose body is ``body``'s class.

    Args:
        body: A body dataclass instance.

    Returns:
        Its :class:`MessageType`.

    Raises:
        FieldTypeError: ``body`` is not a protocol body dataclass.
    """
    try:
        return MESSAGE_TYPES[type(body)]
    except KeyError:
        raise FieldTypeError(f"{type(body).__name__} is not a protocol message body") from None
