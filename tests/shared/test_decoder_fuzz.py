"""Property-based fuzzing of the decoder: whatever arrives, only the project's typed errors come out.

Random bytes, random msgpack structures (shaped like envelopes or not), and valid messages
mutated byte-wise or field-wise must either decode or raise a
:class:`~shared.errors.ProtocolError` subclass: never another exception, never a hang (a
per-example deadline), and never more memory than the documented bound. Valid messages
round-trip exactly.
"""

from __future__ import annotations

import math
import struct
import tracemalloc
from datetime import timedelta
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared import codec
from shared.errors import MalformedMessageError, ProtocolError
from shared.protocol import (
    BODY_TYPES,
    TENSOR_DTYPES,
    Chunk,
    ChunkRequest,
    Envelope,
    FileEntry,
    GlobalAdapter,
    Manifest,
    MessageType,
    Nack,
    Presence,
    TensorPayload,
)
from tests.shared.samples import RUN, SENDER, samples

# Few examples, a generous per-example deadline (this runs on 2 shared, loaded cores), no
# example database on disk: the whole module takes a few seconds.
FUZZ = settings(
    max_examples=100,
    deadline=timedelta(seconds=2),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

VALID = [codec.encode(t, body, run=RUN, round=3, sender=SENDER) for t, body in samples().items()]


def decode_or_typed_error(data: bytes) -> Envelope | None:
    """Decode ``data``; a ProtocolError is an accepted outcome (anything else propagates and fails)."""
    try:
        return codec.decode(data)
    except ProtocolError:
        return None


# --------------------------------------------------------------------------- strategies

MSGPACK_INT = st.integers(min_value=-(2**63), max_value=2**64 - 1)
TEXT_SHORT = st.text(max_size=12)
SCALARS = st.one_of(
    st.none(), st.booleans(), MSGPACK_INT, st.floats(), st.text(max_size=40), st.binary(max_size=64)
)

def _nest(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


HOSTILE = st.one_of(
    st.sampled_from([33, 990, 1010]).map(_nest),  # past the Any cap; past Python's repr recursion limit
    st.sampled_from([4301, 6000]).map(lambda n: "9" * n + ".0"),  # int() refuses more than 4300 digits
    st.sampled_from(["\u0661.\u0660", "1.\u0660"]),  # digits, but not ASCII ones
)
"""Values that broke this decoder once: stack-deep nesting, endless digits, non-ASCII digits."""

PLAIN = st.recursive(
    SCALARS | HOSTILE,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT_SHORT, inner, max_size=5),
    max_leaves=12,
)
"""Any msgpack-able value made of maps with str keys, lists and scalars."""

ODD = SCALARS | HOSTILE
HEADER_VALUES = {
    "version": st.sampled_from(["1.0", "1.7", "2.0", "0.1", "1", "", "1.x"]) | ODD,
    "type": st.sampled_from([t.value for t in MessageType]) | ODD,
    "run": st.just(RUN) | ODD,
    "round": ODD,
    "sender": st.just(SENDER) | ODD,
    "message_id": ODD,
    "timestamp": ODD,
    "body": PLAIN,
}
ENVELOPE_LIKE = st.fixed_dictionaries({}, optional=HEADER_VALUES).flatmap(
    lambda env: st.dictionaries(st.text(max_size=10), PLAIN, max_size=3).map(lambda extra: {**extra, **env})
)
"""Maps with some or all envelope fields, each right-ish or random, plus stray keys."""


META_VALUES = st.recursive(
    st.none() | st.booleans() | MSGPACK_INT | st.floats(allow_nan=False) | TEXT_SHORT | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT_SHORT, inner, max_size=4),
    max_leaves=10,
)
"""Plain values that compare equal after a round trip (no NaN) and nest less than the cap."""


def _tensor(dtype: str, shape: list[int], fill: int) -> TensorPayload:
    size = math.prod(shape) * TENSOR_DTYPES[dtype]
    return TensorPayload(dtype=dtype, shape=shape, data=bytes((fill + i) % 256 for i in range(size)))


TENSORS = st.builds(
    _tensor,
    st.sampled_from(sorted(TENSOR_DTYPES)),
    st.lists(st.integers(min_value=0, max_value=5), max_size=3),
    st.integers(min_value=0, max_value=255),
)
TEXT = st.text(max_size=30)
HEX = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
BODIES = st.one_of(
    st.builds(Presence, TEXT, st.booleans(), TEXT),
    st.builds(Nack, TEXT, MSGPACK_INT, TEXT, TEXT, TEXT),
    st.builds(ChunkRequest, HEX, st.lists(HEX, max_size=4)),
    st.builds(Chunk, HEX, HEX, st.binary(max_size=256)),
    st.builds(GlobalAdapter, MSGPACK_INT, st.dictionaries(TEXT, TENSORS, max_size=3)),
    st.builds(
        Manifest, HEX, TEXT, MSGPACK_INT, TEXT, MSGPACK_INT,
        st.lists(st.builds(FileEntry, TEXT, MSGPACK_INT, st.lists(HEX, max_size=3)), max_size=3),
        st.dictionaries(TEXT, META_VALUES, max_size=3),
    ),
)


# --------------------------------------------------------------------------- properties


@FUZZ
@given(st.binary(max_size=4096))
def test_random_bytes_raise_only_typed_errors(data: bytes) -> None:
    decode_or_typed_error(data)


@FUZZ
@given(PLAIN)
def test_random_msgpack_values_raise_only_typed_errors(value: Any) -> None:
    decode_or_typed_error(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(ENVELOPE_LIKE)
def test_envelope_shaped_maps_raise_only_typed_errors(envelope: dict[str, Any]) -> None:
    decode_or_typed_error(msgpack.packb(envelope, use_bin_type=True))


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(
        st.tuples(st.sampled_from(["flip", "cut", "insert", "delete"]), st.integers(min_value=0), st.binary(min_size=1, max_size=8)),
        min_size=1,
        max_size=4,
    ),
)
def test_byte_mutations_of_valid_messages_raise_only_typed_errors(data: bytes, mutations: list[tuple[str, int, bytes]]) -> None:
    buf = bytearray(data)
    for op, at, chunk in mutations:
        at %= len(buf) + 1
        if op == "flip" and at < len(buf):
            buf[at] ^= chunk[0] or 0xFF
        elif op == "cut":
            del buf[at:]
        elif op == "insert":
            buf[at:at] = chunk
        else:
            del buf[at:at + len(chunk)]
        if not buf:
            break
    decode_or_typed_error(bytes(buf))


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path (a tuple of keys / indices) into a plain value, the root included."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += _paths(item, (*prefix, i))
    return found


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_field_mutations_of_valid_messages_raise_only_typed_errors(data: bytes, draw: st.DataObject) -> None:
    raw = msgpack.unpackb(data, raw=False)
    path = draw.draw(st.sampled_from(_paths(raw)[1:]))
    replacement = draw.draw(PLAIN)
    target = raw
    for key in path[:-1]:
        target = target[key]
    if draw.draw(st.booleans()) and isinstance(target, dict):
        del target[path[-1]]  # a missing field
    else:
        target[path[-1]] = replacement
    decode_or_typed_error(msgpack.packb(raw, use_bin_type=True))


HOSTILE_VALUES = [_nest(33), _nest(1010), "9" * 4301 + ".0", "\u0661.\u0660", b"\xff" * 100_000, 2**64 - 1, -(2**63)]


@pytest.mark.parametrize("field", ["version", "type", "run", "round", "sender", "message_id", "timestamp", "body"])
def test_hostile_values_in_every_envelope_field_raise_only_typed_errors(field: str) -> None:
    # The values random search reaches too rarely, in every header field of every message type.
    for data in VALID:
        for value in HOSTILE_VALUES:
            raw = msgpack.unpackb(data, raw=False)
            raw[field] = value
            decode_or_typed_error(msgpack.packb(raw, use_bin_type=True))


@FUZZ
@given(BODIES, MSGPACK_INT, TEXT.filter(bool), TEXT.filter(bool))
def test_valid_messages_round_trip(body: Any, round_: int, run: str, sender: str) -> None:
    msg_type = next(t for t, cls in BODY_TYPES.items() if cls is type(body))
    data = codec.encode(msg_type, body, run=run, round=round_, sender=sender)
    envelope = codec.decode(data)
    assert envelope.type is msg_type and envelope.body == body
    assert (envelope.run, envelope.round, envelope.sender) == (run, round_, sender)


# --------------------------------------------------------------------------- memory


def _peak_bytes(data: bytes) -> int:
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessageError):
            codec.decode(data)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(
    "data",
    [
        b"\xc6\xff\xff\xff\xff" + bytes(16),  # bin32 of 4 GiB
        b"\xdb\xff\xff\xff\xff" + bytes(16),  # str32 of 4 GiB
        b"\xdd\xff\xff\xff\xff" + bytes(16),  # array32 of 4 G items
        b"\xdf\xff\xff\xff\xff" + bytes(16),  # map32 of 4 G entries
        (b"\xdd" + struct.pack(">I", 1 << 20)) * 1000 + bytes(1 << 20),  # 1000 levels of 1 M items each
    ],
    ids=["bin32", "str32", "array32", "map32", "nested-arrays"],
)
def test_huge_declared_lengths_reserve_nothing(data: bytes) -> None:
    # Refused before anything near the declared size is reserved (tracemalloc sees list reservations).
    assert _peak_bytes(data) < 1 << 20


def test_nested_reservations_stay_within_the_documented_bound() -> None:
    # The worst a message can make msgpack reserve: every one of its 1024 nesting levels declaring
    # the longest allowed list (the message is long enough for the declared length to pass).
    data = (b"\xdc" + struct.pack(">H", codec.MAX_ARRAY_LEN - 1)) * 1000 + bytes(codec.MAX_ARRAY_LEN)
    assert _peak_bytes(data) <= 1024 * 8 * codec.MAX_ARRAY_LEN + (1 << 20)
