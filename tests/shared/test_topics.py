"""Topic building and parsing: every kind round-trips; foreign topics are refused."""

from __future__ import annotations

import pytest

from shared import topics
from shared.errors import TopicError
from shared.protocol import MessageType
from shared.topics import TopicInfo, TopicKind

PER_CLIENT_BUILDERS = {
    TopicKind.HELLO: topics.hello,
    TopicKind.ASSIGN: topics.assign,
    TopicKind.CHUNKREQ: topics.chunkreq,
    TopicKind.CHUNK: topics.chunk,
    TopicKind.UPDATE: topics.update,
    TopicKind.PRESENCE: topics.presence,
    TopicKind.NACK: topics.nack,
}


def test_tree_carries_protocol_major_and_contract_layout() -> None:
    assert topics.schedule("r1") == "fedsoda/v1/r1/schedule"
    assert topics.adapter("r1") == "fedsoda/v1/r1/adapter"
    assert topics.manifest("r1", "t12") == "fedsoda/v1/r1/manifest/t12"
    assert topics.hello("r1", "edge-1") == "fedsoda/v1/r1/hello/edge-1"
    assert topics.chunkreq("r1", "edge-1") == "fedsoda/v1/r1/chunkreq/edge-1"
    assert topics.all_of("r1", TopicKind.UPDATE) == "fedsoda/v1/r1/update/+"
    assert topics.all_of("r1", TopicKind.SCHEDULE) == "fedsoda/v1/r1/schedule"
    assert topics.manifest("r1", "+") == "fedsoda/v1/r1/manifest/+"


@pytest.mark.parametrize("kind", list(PER_CLIENT_BUILDERS))
def test_per_client_topics_parse_back(kind: TopicKind) -> None:
    topic = PER_CLIENT_BUILDERS[kind]("run-7", "jetson_2.a")
    assert topics.parse(topic, run="run-7") == TopicInfo(run="run-7", kind=kind, client="jetson_2.a")


def test_run_wide_and_tier_topics_parse_back() -> None:
    assert topics.parse(topics.schedule("r")) == TopicInfo("r", TopicKind.SCHEDULE)
    assert topics.parse(topics.adapter("r")) == TopicInfo("r", TopicKind.ADAPTER)
    assert topics.parse(topics.manifest("r", "t8")) == TopicInfo("r", TopicKind.MANIFEST, tier="t8")


def test_every_kind_maps_to_a_message_type() -> None:
    assert {topics.message_type_for(k) for k in TopicKind} == set(MessageType)


@pytest.mark.parametrize(
    ("topic", "fragment"),
    [
        ("other/v1/r/schedule", "not a fedsoda topic"),
        ("fedsoda/v2/r/schedule", "v2"),
        ("fedsoda/v1/r/schedule/extra", "no further levels"),
        ("fedsoda/v1/r/hello", "exactly one level"),
        ("fedsoda/v1/r/bogus/x", "unknown kind"),
        ("fedsoda/v1/r/hello/+", "client id"),
        ("fedsoda/v1/other/schedule", "belongs to run"),
        ("fedsoda/v1", "not a fedsoda topic"),
    ],
)
def test_foreign_topics_are_refused(topic: str, fragment: str) -> None:
    with pytest.raises(TopicError, match=fragment):
        topics.parse(topic, run="r")


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "#", "x" * 65, "naïve", "a b"])
def test_invalid_ids_cannot_build_topics(bad: str) -> None:
    with pytest.raises(TopicError):
        topics.hello("run", bad)
    with pytest.raises(TopicError):
        topics.schedule(bad)


def test_per_client_refuses_run_wide_kinds() -> None:
    with pytest.raises(TopicError):
        topics.per_client("r", TopicKind.SCHEDULE, "c")
