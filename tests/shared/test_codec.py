"""Envelope codec: round trips, golden samples, and one typed error per kind of bad input."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import msgpack
import pytest

from shared import codec, topics
from shared.errors import (
    FieldTypeError,
    MalformedMessageError,
    MissingFieldError,
    PayloadTooLargeError,
    TensorError,
    TopicError,
    UnknownMessageTypeError,
    VersionError,
)
from shared.protocol import BODY_TYPES, PROTOCOL_VERSION, MessageType, Presence
from shared.typed import INVALID, Problem, from_plain, to_plain
from tests.shared.samples import (
    GOLDEN_MESSAGE_ID,
    GOLDEN_ROUND,
    GOLDEN_TIMESTAMP,
    RUN,
    SENDER,
    newer_samples,
    samples,
    signed_samples,
)

GOLDEN_DIR = Path(__file__).parent / "golden"


def _raw(msg_type: MessageType = MessageType.HELLO) -> dict[str, Any]:
    body = samples()[msg_type]
    return msgpack.unpackb(codec.encode(msg_type, body, run=RUN, round=1, sender=SENDER), raw=False)


def _pack(raw: Any) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)


@pytest.mark.parametrize("msg_type", list(MessageType))
def test_every_message_type_round_trips(msg_type: MessageType) -> None:
    body = samples()[msg_type]
    env = codec.decode(codec.encode(msg_type, body, run=RUN, round=4, sender=SENDER))
    assert env.type is msg_type and env.body == body and type(env.body) is BODY_TYPES[msg_type]
    assert (env.run, env.round, env.sender, env.version) == (RUN, 4, SENDER, PROTOCOL_VERSION)
    assert len(env.message_id) == 32 and env.timestamp > 0


@pytest.mark.parametrize("msg_type", list(MessageType))
def test_golden_samples_keep_decoding(msg_type: MessageType) -> None:
    path = GOLDEN_DIR / f"{msg_type.value}.msgpack"
    assert path.is_file(), f"golden file {path} is missing; it is generated once by tests/shared/make_golden.py"
    env = codec.decode(path.read_bytes())
    assert env.type is msg_type and env.body == samples()[msg_type]
    assert (env.run, env.round, env.sender) == (RUN, GOLDEN_ROUND, SENDER)
    assert (env.message_id, env.timestamp) == (GOLDEN_MESSAGE_ID, GOLDEN_TIMESTAMP)


def test_golden_files_cover_every_message_type() -> None:
    assert {p.stem for p in GOLDEN_DIR.glob("*.msgpack")} == {t.value for t in MessageType} | set(newer_samples()) | set(signed_samples())


@pytest.mark.parametrize("stem", sorted(newer_samples()))
def test_newer_golden_samples_keep_decoding(stem: str) -> None:
    msg_type, body = newer_samples()[stem]
    env = codec.decode((GOLDEN_DIR / f"{stem}.msgpack").read_bytes())
    assert env.type is msg_type and env.body == body and env.version == stem.rsplit("-", 1)[1]


def test_a_schedule_of_a_1_0_coordinator_decodes_without_a_task() -> None:
    env = codec.decode((GOLDEN_DIR / "schedule.msgpack").read_bytes())
    assert env.version == "1.0" and env.body.task is None


def test_encode_refuses_a_body_of_another_type() -> None:
    with pytest.raises(FieldTypeError, match="carries a Hello body, got Presence"):
        codec.encode(MessageType.HELLO, Presence("c", True, "x"), run="r", round=0, sender="c")


def test_size_cap_is_checked_before_unpacking() -> None:
    data = codec.encode(MessageType.CHUNK, samples()[MessageType.CHUNK], run=RUN, round=0, sender=SENDER)
    with pytest.raises(PayloadTooLargeError, match=f"{len(data)} bytes, over the cap of 100"):
        codec.decode(data, max_bytes=100)


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a valid msgpack"),
        (b"\xc1garbage", "not a valid msgpack"),
        (_pack([1, 2, 3]), "expected a map"),
        (_pack({"version": "1.0"}) + b"\x01", "trailing bytes"),
        # 5 bytes claiming a 2^30-element array / map: refused by the msgpack limits, not allocated.
        (b"\xdd\x40\x00\x00\x00", "not a valid msgpack"),
        (b"\xdf\x40\x00\x00\x00", "not a valid msgpack"),
        (b"\xc7\x01\x05x", "not a valid msgpack"),  # ext types are refused
    ],
)
def test_malformed_bytes(data: bytes, fragment: str) -> None:
    with pytest.raises(MalformedMessageError, match=fragment):
        codec.decode(data)


def test_truncated_message_is_malformed() -> None:
    data = codec.encode(MessageType.UPDATE, samples()[MessageType.UPDATE], run=RUN, round=0, sender=SENDER)
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(MalformedMessageError, match=r"incomplete|not a valid"):
            codec.decode(data[:cut])


@pytest.mark.parametrize("version", ["2.0", "0.9", 1, "one", "1"])
def test_other_major_versions_are_refused(version: Any) -> None:
    raw = _raw()
    raw["version"] = version
    with pytest.raises(VersionError):
        codec.decode(_pack(raw))


def test_newer_major_fails_on_version_even_if_the_body_changed() -> None:
    raw = _raw()
    raw["version"] = "2.0"
    raw["body"] = {"entirely": "different"}
    with pytest.raises(VersionError, match="newer major"):
        codec.decode(_pack(raw))


def test_newer_minor_with_unknown_fields_decodes_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    raw = _raw(MessageType.PRESENCE)
    raw["version"] = "1.7"
    raw["body"]["battery_percent"] = 40
    raw["trace_id"] = "abc"
    with caplog.at_level(logging.WARNING, logger="shared.codec"):
        for _ in range(3):
            env = codec.decode(_pack(raw))
    assert env.body == samples()[MessageType.PRESENCE]
    warnings = [r.getMessage() for r in caplog.records]
    assert sum("battery_percent" in w for w in warnings) <= 1
    assert sum("trace_id" in w for w in warnings) <= 1
    # The field's first sighting in this process warned (unless an earlier test already did).
    codec._warned_unknown.discard(("presence", "body.battery_percent"))
    with caplog.at_level(logging.WARNING, logger="shared.codec"):
        codec.decode(_pack(raw))
    assert any("body.battery_percent" in r.getMessage() for r in caplog.records)


def test_unknown_message_type() -> None:
    raw = _raw()
    raw["type"] = "telemetry"
    with pytest.raises(UnknownMessageTypeError, match="telemetry"):
        codec.decode(_pack(raw))


@pytest.mark.parametrize("field_name", ["version", "type", "run", "round", "sender", "message_id", "timestamp", "body"])
def test_missing_envelope_field(field_name: str) -> None:
    raw = _raw()
    del raw[field_name]
    with pytest.raises(MissingFieldError, match=field_name):
        codec.decode(_pack(raw))


def test_missing_nested_body_field_names_its_path() -> None:
    raw = _raw(MessageType.HELLO)
    del raw["body"]["profile"]["cpu_count"]
    with pytest.raises(MissingFieldError, match=r"body\.profile\.cpu_count"):
        codec.decode(_pack(raw))


@pytest.mark.parametrize(
    ("msg_type", "mutate", "fragment"),
    [
        (MessageType.HELLO, lambda r: r.__setitem__("round", "3"), "round: expected int"),
        (MessageType.HELLO, lambda r: r["body"].__setitem__("num_examples", True), "num_examples: expected int"),
        (MessageType.HELLO, lambda r: r["body"]["profile"].__setitem__("accelerator", "tpu"), "must be one of"),
        (MessageType.SCHEDULE, lambda r: r["body"].__setitem__("status", "paused"), "status"),
        (
            MessageType.SCHEDULE,
            lambda r: r["body"]["training"].__setitem__("target_modules", "q_proj"),
            "expected a list",
        ),
        (MessageType.SCHEDULE, lambda r: r["body"].__setitem__("participants", {"a": 1}), r"participants\['a'\]"),
        (MessageType.CHUNK, lambda r: r["body"].__setitem__("data", "text"), "data: expected bytes"),
        (MessageType.UPDATE, lambda r: r["body"]["metrics"].__setitem__("loss", "low"), "expected float"),
        (MessageType.HELLO, lambda r: r.__setitem__("body", [1]), "expected a map for Hello"),
    ],
)
def test_wrong_field_types(msg_type: MessageType, mutate: Any, fragment: str) -> None:
    raw = _raw(msg_type)
    mutate(raw)
    with pytest.raises(FieldTypeError, match=fragment):
        codec.decode(_pack(raw))


def test_any_fields_are_depth_capped() -> None:
    raw = _raw(MessageType.ASSIGNMENT)
    deep: Any = 1
    for _ in range(100):
        deep = [deep]
    raw["body"]["plan"]["nested"] = deep
    with pytest.raises(FieldTypeError, match="nested deeper than"):
        codec.decode(_pack(raw))


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda t: t.__setitem__("dtype", "float64"), "not allowed"),
        (lambda t: t.__setitem__("data", t["data"][:-1]), "needs"),
        (lambda t: t.__setitem__("shape", [1000, 1000]), "needs"),
    ],
)
def test_bad_tensors_raise_tensor_error(mutate: Any, fragment: str) -> None:
    raw = _raw(MessageType.UPDATE)
    mutate(next(iter(raw["body"]["delta"].values())))
    with pytest.raises(TensorError, match=fragment):
        codec.decode(_pack(raw))


def test_decode_message_checks_topic_against_envelope() -> None:
    hello = codec.encode(MessageType.HELLO, samples()[MessageType.HELLO], run=RUN, round=-1, sender=SENDER)
    info, env = codec.decode_message(topics.hello(RUN, SENDER), hello, run=RUN)
    assert info.client == SENDER and env.type is MessageType.HELLO
    with pytest.raises(TopicError, match="claims sender"):
        codec.decode_message(topics.hello(RUN, "edge-9"), hello, run=RUN)
    with pytest.raises(TopicError, match="carries update messages"):
        codec.decode_message(topics.update(RUN, SENDER), hello, run=RUN)
    with pytest.raises(TopicError, match="belongs to run"):
        codec.decode_message(topics.hello("other", SENDER), hello, run=RUN)
    foreign = codec.encode(MessageType.HELLO, samples()[MessageType.HELLO], run="other", round=-1, sender=SENDER)
    with pytest.raises(TopicError, match="names run"):
        codec.decode_message(topics.hello(RUN, SENDER), foreign, run=RUN)


class Color(Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Inner:
    weights: tuple[float, ...]
    pair: tuple[int, str]


@dataclass(frozen=True)
class Outer:
    name: str
    inner: Inner
    maybe: Inner | None
    color: Color
    mode: Literal[1, 2]
    table: dict[str, list[Inner]] = field(default_factory=dict)
    note: str = "default"


def test_generic_converter_handles_every_hint_kind() -> None:
    value = Outer("x", Inner((1.0, 2.5), (3, "a")), None, Color.BLUE, 2, {"k": [Inner((0.5,), (1, "b"))]})
    plain = to_plain(value)
    assert plain["color"] == "blue" and plain["inner"]["weights"] == [1.0, 2.5]
    problems: list[Problem] = []
    assert from_plain(Outer, plain, problems) == value and problems == []


def test_generic_converter_collects_all_problems() -> None:
    plain = {"name": 1, "inner": {"weights": [1, "x"], "pair": [1]}, "color": "green", "mode": True, "extra": 0}
    problems: list[Problem] = []
    assert from_plain(Outer, plain, problems) is INVALID
    found = {(p.kind, p.path) for p in problems}
    assert ("unknown", "extra") in found
    assert ("missing", "maybe") in found
    assert ("type", "name") in found
    assert ("type", "inner.weights[1]") in found
    assert ("type", "inner.pair") in found
    assert ("type", "color") in found
    assert ("type", "mode") in found  # True is not the literal 1


def test_a_received_envelope_repacks_with_its_own_header_version_included() -> None:
    older = codec.encode(MessageType.PRESENCE, Presence("c", True, "x"), run=RUN, round=0, sender="c", version="1.0")
    env = codec.decode(older)
    assert env.version == "1.0" and codec.decode(codec.encode_envelope(env)) == env
