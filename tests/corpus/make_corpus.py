"""Generate the hostile-message corpus: ``tests/corpus/messages/*.bin`` and ``index.json``.

Each file is the raw payload of one MQTT message that a live coordinator or a live client
must refuse; ``index.json`` says, for each, the topic it is sent on, which process receives
it, and the reason the refusal must be logged and counted under (an error class name, an
update rejection code, a chunk-request nack code or ``stale``) plus a substring of the
logged detail. ``tests/corpus/test_corpus.py`` sends the whole corpus over a real broker.

The messages target the live test's run: run id ``corpus``, the client ``edge-1``, the
test's scripted client ``probe`` (assigned to round 1), and the tier ``L2`` that the
4-layer SmolLM2 cut with ``pruning.depths = [2]`` yields (layers 0 and 3; LoRA rank 4 on
``q_proj`` / ``v_proj``; hidden size 576, key/value size 192).

Client-bound messages are signed with the corpus coordinator key (:data:`CORPUS_KEY`, which
the live test's coordinator signs with and its client pins), so each still reaches the check
it is about, behind the signature: they play a coordinator that is buggy or whose key leaked.
Garbage that is no msgpack map is signed inside a map frame, so the client's parser meets it.
The ``signature`` entries are what a stranger can send: unsigned, altered, or signed by
another key; each must be refused as a ``SignatureError`` before anything else is read.

Regenerate after a protocol change (the corpus test fails until the files match)::

    .venv/bin/python -m tests.corpus.make_corpus
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import numpy as np

from shared import codec
from shared.manifests import compute_blob_id
from shared.protocol import (
    Assignment,
    Chunk,
    ChunkRequest,
    DeviceProfile,
    FileEntry,
    GlobalAdapter,
    Hello,
    Manifest,
    MessageType,
    Nack,
    Presence,
    ResourceReport,
    Schedule,
    TensorPayload,
    TrainingParams,
    Update,
)
from shared.signing import SigningKey
from shared.typed import to_plain

CORPUS_DIR = Path(__file__).parent
MESSAGES_DIR = CORPUS_DIR / "messages"
INDEX_FILE = CORPUS_DIR / "index.json"

RUN = "corpus"
CLIENT = "edge-1"
PROBE = "probe"
COORDINATOR = "coordinator"
ROUND = 1
TIER = "L2"
RANK = 4
HIDDEN = 576
KV = 192
KEY_QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"  # shape (RANK, HIDDEN)
KEY_VB = "base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight"  # shape (KV, RANK)
KEY_PRUNED = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"  # a layer L2 does not hold
TIMESTAMP = 1_750_000_000.0
CORPUS_SIGNING_SEED = b"fedsoda corpus coordinator key.."
"""Seed of :data:`CORPUS_KEY` (Ed25519 signs deterministically, so the files are reproducible)."""
CORPUS_KEY = SigningKey.from_seed(CORPUS_SIGNING_SEED)
"""The live test's coordinator key: client-bound corpus messages are signed with it."""
MALLORY_KEY = SigningKey.from_seed(b"fedsoda corpus mallory's key....")
"""A stranger's own key: what it signs, a client pinning :data:`CORPUS_KEY` refuses."""


@dataclass(frozen=True)
class Entry:
    """One corpus message.

    Attributes:
        name: File stem (``c012-...`` for the coordinator, ``k012-...`` for the client).
        target: ``coordinator`` or ``client``: the process that must refuse it.
        topic: The MQTT topic it is published on.
        category: Which kind of bad input (see the README's corpus section).
        reason: The refusal counter key it must be counted under.
        detail: A substring of the logged refusal detail.
        what: What is wrong with it, in words.
        payload: The raw bytes.
    """

    name: str
    target: str
    topic: str
    category: str
    reason: str
    detail: str
    what: str
    payload: bytes

    def meta(self) -> dict[str, Any]:
        """The index.json record (the payload lives in its own file)."""
        return {
            "file": f"{self.name}.bin",
            "target": self.target,
            "topic": self.topic,
            "kind": self.topic.split("/")[3],  # not topics.parse: some topics are invalid on purpose
            "category": self.category,
            "reason": self.reason,
            "detail": self.detail,
            "what": self.what,
            "bytes": len(self.payload),
            "sha256": hashlib.sha256(self.payload).hexdigest(),
        }


# --------------------------------------------------------------------------- builders


def _encode(msg_type: MessageType, body: Any, *, sender: str, round_: int = -1, run: str = RUN) -> bytes:
    return codec.encode(msg_type, body, run=run, round=round_, sender=sender, message_id="c0" * 16, timestamp=TIMESTAMP)


def _raw(msg_type: MessageType, body: Any, *, sender: str, round_: int = -1) -> dict[str, Any]:
    """A valid envelope as a plain dict, to break one thing in it."""
    return msgpack.unpackb(_encode(msg_type, body, sender=sender, round_=round_), raw=False)


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _tensor(values: np.ndarray) -> TensorPayload:
    return TensorPayload(dtype=str(values.dtype), shape=list(values.shape), data=values.tobytes())


def _bf16(shape: tuple[int, ...], fill_bits: int) -> TensorPayload:
    data = struct.pack("<H", fill_bits) * int(np.prod(shape))
    return TensorPayload(dtype="bfloat16", shape=list(shape), data=data)


def _profile(**changes: Any) -> DeviceProfile:
    profile = DeviceProfile(
        name="corpus-box",
        device_class="cpu-16gb",
        accelerator="cpu",
        total_memory_bytes=16 << 30,
        available_memory_bytes=12 << 30,
        unified_memory=False,
        gpu_name="",
        gpu_total_memory_bytes=0,
        gpu_free_memory_bytes=0,
        compute_capability="",
        cpu_count=4,
        supports_4bit=True,
        is_jetson=False,
    )
    return dataclasses.replace(profile, **changes)


def _hello(client: str, **changes: Any) -> Hello:
    hello = Hello(client_id=client, profile=_profile(), num_examples=8, software_version="fedsoda 0.1.0")
    return dataclasses.replace(hello, **changes)


def _update(client: str = PROBE, round_: int = ROUND, delta: dict[str, TensorPayload] | None = None, **changes: Any) -> Update:
    if delta is None:
        delta = {KEY_QA: _tensor(np.zeros((RANK, HIDDEN), dtype=np.float32))}
    update = Update(
        client_id=client,
        round=round_,
        num_examples=8,
        delta=delta,
        metrics={"loss_last": 1.0},
        resources=ResourceReport(0, 0, 1.0, 1.0, 0, 0, "cpu-16gb"),
    )
    return dataclasses.replace(update, **changes)


def _training(**changes: Any) -> TrainingParams:
    training = TrainingParams(
        local_steps=1, learning_rate=2e-3, batch_size=2, seq_len=16, lora_rank=RANK, lora_alpha=8.0,
        lora_dropout=0.0, target_modules=["q_proj", "v_proj"], mu=0.01, seed=0,
    )
    return dataclasses.replace(training, **changes)


def _schedule(**changes: Any) -> Schedule:
    schedule = Schedule(
        round=ROUND, status="running", deadline=TIMESTAMP + 600, quorum=1,
        participants={CLIENT: TIER, PROBE: TIER}, training=_training(), manifests={TIER: "a" * 64}, adapter_round=0,
    )
    return dataclasses.replace(schedule, **changes)


def _manifest(paths: list[str], *, tier: str = "evil", version: int = 1, blob_id: str | None = None, **changes: Any) -> Manifest:
    """A manifest whose blob_id matches its file list (unless given), so only the named flaw trips."""
    files = [FileEntry(path=p, size=4, chunks=[hashlib.sha256(p.encode()).hexdigest()]) for p in paths]
    manifest = Manifest(
        blob_id=blob_id or compute_blob_id(files, 4), name="evil", version=version, tier=tier,
        chunk_size=4, files=files, meta={"model_config": {}},
    )
    return dataclasses.replace(manifest, **changes)


def _nested(depth: int, leaf: bytes = b"\x90") -> bytes:
    """msgpack bytes of ``depth`` one-element arrays around ``leaf``."""
    return b"\x91" * depth + leaf


def _splice(raw: dict[str, Any], field: str, value_bytes: bytes) -> bytes:
    """Pack ``raw`` with ``field`` replaced by raw msgpack bytes (for values msgpack-python cannot build)."""
    marker = "@@splice@@"
    packed = _pack(dict(raw, **{field: marker}))
    return packed.replace(_pack(marker), value_bytes, 1)


def _topic(kind: str, segment: str | None = None) -> str:
    base = f"fedsoda/v1/{RUN}/{kind}"
    return base if segment is None else f"{base}/{segment}"


# --------------------------------------------------------------------------- the corpus


def _coordinator_entries() -> list[tuple[str, str, str, str, str, str, bytes]]:
    """(slug, topic, category, reason, detail, what, payload) of every coordinator-bound message."""
    rng = random.Random(7)
    hello = _encode(MessageType.HELLO, _hello("x04"), sender="x04")
    update = _encode(MessageType.UPDATE, _update(), sender=PROBE, round_=ROUND)
    raw_upd = _raw(MessageType.UPDATE, _update(), sender=PROBE, round_=ROUND)

    def upd(change: Callable[[dict[str, Any]], None]) -> bytes:
        raw = json_copy(raw_upd)
        change(raw)
        return _pack(raw)

    def body_tensor(change: Callable[[dict[str, Any]], None]) -> bytes:
        return upd(lambda r: change(r["body"]["delta"][KEY_QA]))

    probe_update = _topic("update", PROBE)

    def probe(delta: dict[str, TensorPayload] | None = None, *, envelope_round: int | None = None, **changes: Any) -> bytes:
        """An update from the probe (assigned to round 1) with one thing changed."""
        body = _update(delta=delta, **changes)
        return _encode(MessageType.UPDATE, body, sender=PROBE, round_=body.round if envelope_round is None else envelope_round)

    def zeros(dtype: Any = np.float32, shape: tuple[int, ...] = (RANK, HIDDEN)) -> np.ndarray:
        return np.zeros(shape, dtype)
    out = [
        # -- truncated and garbage bytes
        ("empty", _topic("update", "x01"), "truncated", "MalformedMessageError", "incomplete input", "zero bytes", b""),
        ("truncated-half", probe_update, "truncated", "MalformedMessageError", "incomplete input",
         "a valid update cut in half", update[: len(update) // 2]),
        ("truncated-last-byte", _topic("hello", "x03"), "truncated", "MalformedMessageError", "not a valid msgpack",
         "a valid hello without its last byte", _encode(MessageType.HELLO, _hello("x03"), sender="x03")[:-1]),
        ("trailing-bytes", _topic("hello", "x04"), "garbage", "MalformedMessageError", "trailing bytes",
         "a valid hello followed by 3 bytes", hello + b"\x01\x02\x03"),
        ("never-used-byte", _topic("presence", "x05"), "garbage", "MalformedMessageError", "not a valid msgpack",
         "0xc1, the one byte msgpack never uses", b"\xc1"),
        ("random-bytes", _topic("update", "x06"), "garbage", "MalformedMessageError", "not a valid msgpack",
         "256 seeded random bytes after a reserved byte", b"\xc1" + rng.randbytes(256)),
        ("json-text", _topic("hello", "x07"), "garbage", "MalformedMessageError", "trailing bytes",
         "a JSON document (msgpack reads '{' as the int 123, then finds bytes after it)", b'{"type": "hello"}'),
        ("array-envelope", _topic("update", "x08"), "wrong-type", "MalformedMessageError", "expected a map",
         "a msgpack array instead of the envelope map", _pack(["hello", 1, 2])),
        ("invalid-utf8", _topic("presence", "x09"), "garbage", "MalformedMessageError", "utf-8",
         "a str whose bytes are not UTF-8", b"\x81\xa1v\xa2\xed\xa0"),
        ("ext-type", _topic("chunkreq", "x10"), "garbage", "MalformedMessageError", "not a valid msgpack",
         "a msgpack ext value (never allowed)", b"\x81\xa1v\xd4\x05\x00"),
        ("int-map-key", _topic("update", "x11"), "wrong-type", "MalformedMessageError", "not allowed for map key",
         "a map with an integer key", b"\x81\x01\x02"),
        # -- huge declared lengths (a few bytes claiming gigabytes; nothing is allocated)
        ("bin32-4gib", _topic("update", "x12"), "huge-length", "MalformedMessageError", "not a valid msgpack",
         "a bin32 header declaring 4 GiB, 10 bytes present", b"\xc6\xff\xff\xff\xff" + bytes(10)),
        ("str32-200mib", _topic("hello", "x13"), "huge-length", "MalformedMessageError", "not a valid msgpack",
         "a str32 header declaring 200 MiB", b"\xdb" + struct.pack(">I", 200 << 20) + b"abc"),
        ("array32-4g", _topic("update", "x14"), "huge-length", "MalformedMessageError", "not a valid msgpack",
         "an array32 header declaring 2^32-1 items", b"\xdd\xff\xff\xff\xff\x00"),
        ("map32-2g", _topic("presence", "x15"), "huge-length", "MalformedMessageError", "not a valid msgpack",
         "a map32 header declaring 2^31 entries", b"\xdf\x80\x00\x00\x00\xa0\x00"),
        ("nested-array-bomb", _topic("update", "x16"), "huge-length", "MalformedMessageError", "not a valid msgpack",
         "500 nested array32 headers each declaring 65536 items (reserved memory if unbounded)",
         (b"\xdd" + struct.pack(">I", 65536)) * 500 + bytes(3000)),
        # -- deep nesting
        ("nesting-2000", _topic("hello", "x17"), "deep-nesting", "MalformedMessageError", "deeper than msgpack's limit",
         "2000 nested arrays (over msgpack's stack)", _nested(2000)),
        ("nesting-1000-in-sender", _topic("hello", "x18"), "deep-nesting", "FieldTypeError", "sender: expected str",
         "the sender field is 1000 nested arrays (repr would overflow the stack)",
         _splice(_raw(MessageType.HELLO, _hello("x18"), sender="x18"), "sender", _nested(1000))),
        ("nesting-in-metrics", probe_update, "deep-nesting", "FieldTypeError", "body.metrics",
         "update metrics value is 300 nested arrays",
         _splice_body(raw_upd, "metrics", b"\x81\xa4loss" + _nested(300))),
        # -- protocol versions
        ("version-2.0", probe_update, "version", "VersionError", "newer major",
         "protocol 2.0 with a body this build does not know", upd(lambda r: r.update(version="2.0", body={"v2": True}))),
        ("version-99.1", _topic("hello", "x21"), "version", "VersionError", "newer major",
         "protocol 99.1 hello", _pack(dict(_raw(MessageType.HELLO, _hello("x21"), sender="x21"), version="99.1"))),
        ("version-0.9", _topic("presence", "x22"), "version", "VersionError", "older major", "protocol 0.9",
         _pack(dict(_raw(MessageType.PRESENCE, Presence("x22", True, "hi"), sender="x22"), version="0.9"))),
        ("version-int", _topic("hello", "x23"), "version", "VersionError", "'major.minor' string", "version 1 as an int",
         _pack(dict(_raw(MessageType.HELLO, _hello("x23"), sender="x23"), version=1))),
        ("version-5000-digits", _topic("hello", "x24"), "version", "VersionError", "'major.minor' string",
         "a 5000-digit major version (int() refuses such strings)",
         _pack(dict(_raw(MessageType.HELLO, _hello("x24"), sender="x24"), version="9" * 5000 + ".0"))),
        ("version-missing", _topic("hello", "x25"), "version", "MissingFieldError", "'version' is missing",
         "no version field",
         _pack({k: v for k, v in _raw(MessageType.HELLO, _hello("x25"), sender="x25").items() if k != "version"})),
        # -- unknown message types
        ("type-teleport", _topic("update", "x26"), "unknown-type", "UnknownMessageTypeError", "'teleport'",
         "type 'teleport'", _pack(dict(_raw(MessageType.PRESENCE, Presence("x26", True, ""), sender="x26"), type="teleport"))),
        ("type-int", _topic("update", "x27"), "unknown-type", "UnknownMessageTypeError", "unknown message type 7",
         "type 7", _pack(dict(_raw(MessageType.PRESENCE, Presence("x27", True, ""), sender="x27"), type=7))),
        ("type-empty", _topic("hello", "x28"), "unknown-type", "UnknownMessageTypeError", "unknown message type ''",
         "type ''", _pack(dict(_raw(MessageType.HELLO, _hello("x28"), sender="x28"), type=""))),
        # -- wrong types and fields
        ("presence-on-update-topic", _topic("update", "x29"), "wrong-type", "TopicError", "carries update messages",
         "a valid presence sent on an update topic", _encode(MessageType.PRESENCE, Presence("x29", True, ""), sender="x29")),
        ("other-run", probe_update, "wrong-type", "TopicError", "names run 'other-run'",
         "a valid update of another run", _encode(MessageType.UPDATE, _update(), sender=PROBE, round_=ROUND, run="other-run")),
        ("round-as-string", probe_update, "wrong-type", "FieldTypeError", "round: expected int",
         "envelope round '1'", upd(lambda r: r.update(round="1"))),
        ("num-examples-bool", probe_update, "wrong-type", "FieldTypeError", "num_examples: expected int",
         "num_examples true", upd(lambda r: r["body"].update(num_examples=True))),
        ("body-is-string", probe_update, "wrong-type", "FieldTypeError", "expected a map for Update",
         "the body is a string", upd(lambda r: r.update(body="x"))),
        ("missing-delta", probe_update, "wrong-type", "MissingFieldError", "body.delta",
         "an update without its delta", upd(lambda r: r["body"].pop("delta"))),
        ("profile-is-list", _topic("hello", "x35"), "wrong-type", "FieldTypeError", "expected a map for DeviceProfile",
         "hello profile is a list", _hello_raw("x35", lambda b: b.update(profile=[1, 2]))),
        ("accelerator-tpu", _topic("hello", "x36"), "wrong-type", "FieldTypeError", "accelerator: must be one of",
         "accelerator 'tpu' (not in the Literal)", _hello_raw("x36", lambda b: b["profile"].update(accelerator="tpu"))),
        ("bad-topic-segment", _topic("update", "ev!l"), "wrong-type", "TopicError", "client id 'ev!l'",
         "a topic whose client segment is not an id", update),
        # -- tensors
        ("tensor-bytes-short", probe_update, "tensor", "TensorError", "needs 9216 bytes, got 9215",
         "a delta tensor one byte short", body_tensor(lambda t: t.update(data=t["data"][:-1]))),
        ("tensor-bytes-long", probe_update, "tensor", "TensorError", "needs 9216 bytes, got 9220",
         "a delta tensor four bytes long", body_tensor(lambda t: t.update(data=t["data"] + b"\0\0\0\0"))),
        ("tensor-dtype-float128", probe_update, "tensor", "TensorError", "'float128' is not allowed",
         "dtype float128", body_tensor(lambda t: t.update(dtype="float128"))),
        ("tensor-dtype-pickle", probe_update, "tensor", "TensorError", "'pickle' is not allowed",
         "dtype 'pickle'", body_tensor(lambda t: t.update(dtype="pickle"))),
        ("tensor-negative-dim", probe_update, "tensor", "TensorError", "negative dimension",
         "shape [-4, -576]", body_tensor(lambda t: t.update(shape=[-RANK, -HIDDEN]))),
        ("tensor-shape-overflow", probe_update, "tensor", "TensorError", "needs",
         "shape [2^62, 2^62] (a product no buffer has)", body_tensor(lambda t: t.update(shape=[1 << 62, 1 << 62]))),
        # -- update content (the probe is assigned to round 1, so these reach validation)
        ("delta-nan", probe_update, "nan-inf", "nan", "NaN/Inf",
         "one NaN in a delta", probe({KEY_QA: _tensor(_with(zeros(), np.nan))})),
        ("delta-inf", probe_update, "nan-inf", "nan", "NaN/Inf",
         "+Inf in a float32 delta", probe({KEY_QA: _tensor(_with(zeros(), np.inf))})),
        ("delta-minus-inf-bf16", probe_update, "nan-inf", "nan", "NaN/Inf",
         "a bfloat16 delta of -Inf", probe({KEY_VB: _bf16((KV, RANK), 0xFF80)})),
        ("delta-norm-1e30", probe_update, "norm", "norm", "not below the bound",
         "every value 1e30 (norm ~5e31)", probe({KEY_QA: _tensor(zeros() + np.float32(1e30))})),
        ("delta-norm-480", probe_update, "norm", "norm", "not below the bound",
         "every value 10 (norm 480, bound 100)", probe({KEY_QA: _tensor(zeros() + np.float32(10.0))})),
        ("delta-wrong-shape", probe_update, "shape-keys", "shape", "expected (4, 576)",
         "q_proj lora_A of shape (4, 577)", probe({KEY_QA: _tensor(zeros(shape=(RANK, HIDDEN + 1)))})),
        ("delta-transposed", probe_update, "shape-keys", "shape", "expected (4, 576)",
         "q_proj lora_A transposed", probe({KEY_QA: _tensor(zeros(shape=(HIDDEN, RANK)))})),
        ("delta-pruned-layer-key", probe_update, "shape-keys", "keys", "not in the tier's adapter",
         "a key of layer 1, which tier L2 does not hold", probe({KEY_PRUNED: _tensor(zeros())})),
        ("delta-unknown-key", probe_update, "shape-keys", "keys", "not in the tier's adapter",
         "a key that is no adapter weight", probe({"lm_head.weight": _tensor(zeros(shape=(2, 2)))})),
        ("delta-empty", probe_update, "shape-keys", "keys", "holds no tensors",
         "an empty delta", probe({})),
        ("delta-int8", probe_update, "shape-keys", "dtype", "has dtype int8",
         "an int8 delta", probe({KEY_QA: _tensor(zeros(np.int8))})),
        ("num-examples-zero", probe_update, "wrong-type", "examples", "num_examples=0",
         "num_examples 0", probe(num_examples=0)),
        ("num-examples-huge", probe_update, "wrong-type", "examples", "num_examples=1000000000000",
         "num_examples 10^12 (would dominate the average)", probe(num_examples=10**12)),
        # -- trust nothing: senders, assignment, open rounds
        ("sender-not-topic", _topic("update", CLIENT), "sender", "TopicError", "claims sender 'probe'",
         "an update from probe on edge-1's topic", _encode(MessageType.UPDATE, _update(), sender=PROBE, round_=ROUND)),
        ("body-client-not-sender", probe_update, "sender", "sender", "must be the same",
         "probe's envelope carrying an update whose client_id is edge-1", probe(client_id=CLIENT)),
        ("envelope-round-differs", probe_update, "sender", "round", "differs from update round",
         "envelope round 5, update round 1", probe(envelope_round=5)),
        ("not-assigned", _topic("update", "stranger"), "sender", "not_assigned", "not assigned to round 1",
         "an update from a client that never said hello", _encode(MessageType.UPDATE, _update(client_id="stranger"), sender="stranger", round_=ROUND)),
        ("round-not-open", probe_update, "sender", "round", "has not started",
         "an update for round 7", probe(round=7)),
        ("round-over", probe_update, "sender", "late", "round 0 is over",
         "an update for round 0", probe(round=0)),
        ("hello-other-client", _topic("hello", "x60"), "sender", "TopicError", "names client 'x61'",
         "a hello on x60's topic naming x61", _encode(MessageType.HELLO, _hello("x61"), sender="x60")),
        ("presence-other-client", _topic("presence", CLIENT), "sender", "TopicError", "names another client",
         "edge-1's presence topic and sender, naming probe offline", _encode(MessageType.PRESENCE, Presence(PROBE, False, "x"), sender=CLIENT)),
        ("hello-negative-examples", _topic("hello", "x62"), "wrong-type", "FieldTypeError", "num_examples=-5",
         "a hello claiming -5 examples", _encode(MessageType.HELLO, _hello("x62", num_examples=-5), sender="x62")),
        ("hello-negative-memory", _topic("hello", "x63"), "wrong-type", "FieldTypeError", "available_memory_bytes=-1",
         "a hello with -1 bytes of memory", _encode(MessageType.HELLO, _hello("x63", profile=_profile(available_memory_bytes=-1)), sender="x63")),
        ("hello-compute-capability", _topic("hello", "x64"), "wrong-type", "FieldTypeError", "compute_capability",
         "compute capability 'x.y' (float() of it would raise in the planner)",
         _encode(MessageType.HELLO, _hello("x64", profile=_profile(compute_capability="x.y")), sender="x64")),
        ("chunkreq-stranger", _topic("chunkreq", "stranger"), "sender", "not_admitted", "never admitted",
         "a chunk request from a client that never said hello",
         _encode(MessageType.CHUNK_REQUEST, ChunkRequest("a" * 64, ["b" * 64]), sender="stranger")),
        ("chunkreq-unknown-blob", _topic("chunkreq", PROBE), "sender", "unknown_blob", "is not served",
         "probe asks for a blob nobody serves", _encode(MessageType.CHUNK_REQUEST, ChunkRequest("a" * 64, ["b" * 64]), sender=PROBE)),
        ("chunkreq-hashes-not-str", _topic("chunkreq", PROBE), "wrong-type", "FieldTypeError", "hashes[0]: expected str",
         "chunk request hashes [1, 2]", _pack(dict(_raw(MessageType.CHUNK_REQUEST, ChunkRequest("a" * 64, []), sender=PROBE),
                                                    body={"blob_id": "a" * 64, "hashes": [1, 2]}))),
    ]
    return out


def _as_coordinator(payload: bytes) -> bytes:
    """``payload`` signed with :data:`CORPUS_KEY`, whatever it holds.

    An envelope (a msgpack fixmap) gets its signature as the first entry; anything else is
    framed as a map of the signature and two more entries that are ``payload``, so that
    after the signature the client's parser meets the garbage as it is.
    """
    framed = payload if payload and 0x80 <= payload[0] < 0x8F else b"\x82" + payload
    return b"".join(CORPUS_KEY.sign_packed([framed]))


def _client_entries() -> list[tuple[str, str, str, str, str, str, bytes]]:
    """(slug, topic, category, reason, detail, what, payload) of every client-bound message.

    All are signed with :data:`CORPUS_KEY` but the ``signature`` ones, which come last.
    """
    signed = [(*row[:6], _as_coordinator(row[6])) for row in _client_checks()]
    schedule_topic, adapter_topic = _topic("schedule"), _topic("adapter")
    nack_topic, chunk_topic = _topic("nack", CLIENT), _topic("chunk", CLIENT)
    finished = _encode(MessageType.SCHEDULE, _schedule(round=ROUND + 1, status="finished"), sender=COORDINATOR, round_=ROUND + 1)
    altered = bytearray(_as_coordinator(finished))
    altered[-1] ^= 0x01
    far_future = GlobalAdapter(round=10**9, tensors={})
    nack = Nack(CLIENT, ROUND, "", "unknown_blob", "forged")
    forged_chunk = Chunk(blob_id="a" * 64, hash=hashlib.sha256(b"x").hexdigest(), data=b"x")

    def by(key: SigningKey, msg_type: MessageType, body: Any, round_: int = -1) -> bytes:
        return codec.encode(msg_type, body, run=RUN, round=round_, sender=COORDINATOR, message_id="c0" * 16,
                            timestamp=TIMESTAMP, signer=key)

    return signed + [
        ("schedule-unsigned-finished", schedule_topic, "signature", "SignatureError", "not signed",
         "an unsigned 'finished' schedule (it used to end every client)", finished),
        ("schedule-altered-finished", schedule_topic, "signature", "SignatureError", "does not verify",
         "a signed 'finished' schedule with its last byte flipped", bytes(altered)),
        ("adapter-mallory-key", adapter_topic, "signature", "SignatureError", "does not verify",
         "a global adapter of round 10**9 signed by a stranger's key", by(MALLORY_KEY, MessageType.GLOBAL_ADAPTER, far_future, 10**9)),
        ("nack-unsigned", nack_topic, "signature", "SignatureError", "not signed",
         "an unsigned unknown_blob nack (it used to stop a download)", _encode(MessageType.NACK, nack, sender=COORDINATOR, round_=ROUND)),
        ("chunk-mallory-key", chunk_topic, "signature", "SignatureError", "does not verify",
         "a well-formed chunk signed by a stranger's key", by(MALLORY_KEY, MessageType.CHUNK, forged_chunk)),
    ]


def _client_checks() -> list[tuple[str, str, str, str, str, str, bytes]]:
    """The client-bound messages about checks behind the signature (unsigned here; signed by the caller)."""
    schedule_topic, adapter_topic = _topic("schedule"), _topic("adapter")
    assign_topic, nack_topic, chunk_topic = _topic("assign", CLIENT), _topic("nack", CLIENT), _topic("chunk", CLIENT)
    schedule = _encode(MessageType.SCHEDULE, _schedule(), sender=COORDINATOR, round_=ROUND)

    def sched(**changes: Any) -> bytes:
        return _encode(MessageType.SCHEDULE, _schedule(**changes), sender=COORDINATOR, round_=ROUND)

    def train(**changes: Any) -> bytes:
        return sched(training=_training(**changes))

    def manifest(slug: str, tier: str, paths: list[str], category: str, reason: str, detail: str, what: str,
                 **changes: Any) -> tuple[str, str, str, str, str, str, bytes]:
        body = _manifest(paths, tier=tier, **changes)
        payload = _encode(MessageType.MANIFEST, body, sender=COORDINATOR)
        return slug, _topic("manifest", tier), category, reason, detail, what, payload

    def adapter(tensors: dict[str, TensorPayload], round_: int = 0) -> bytes:
        return _encode(MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=round_, tensors=tensors), sender=COORDINATOR, round_=round_)

    def assignment(**changes: Any) -> bytes:
        body = Assignment(client_id=CLIENT, accepted=True, tier=TIER, reason="fits", plan={"batch_size": 2})
        return _encode(MessageType.ASSIGNMENT, dataclasses.replace(body, **changes), sender=COORDINATOR)

    def chunk(data: bytes, digest: str, sender: str = COORDINATOR) -> bytes:
        return _encode(MessageType.CHUNK, Chunk(blob_id="a" * 64, hash=digest, data=data), sender=sender)

    zeros = np.zeros((RANK, HIDDEN), np.float32)
    out = [
        # -- schedule
        ("schedule-garbage", schedule_topic, "garbage", "MalformedMessageError", "not a valid msgpack",
         "0xc1 and 64 random bytes", b"\xc1" + random.Random(11).randbytes(64)),
        ("schedule-truncated", schedule_topic, "truncated", "MalformedMessageError", "incomplete input",
         "a valid schedule cut after 40 bytes", schedule[:40]),
        ("schedule-version-3.0", schedule_topic, "version", "VersionError", "newer major",
         "a protocol 3.0 schedule", _pack(dict(msgpack.unpackb(schedule, raw=False), version="3.0"))),
        ("schedule-from-mallory", schedule_topic, "sender", "TopicError", "come from the coordinator",
         "a valid schedule whose sender is 'mallory'", _encode(MessageType.SCHEDULE, _schedule(), sender="mallory", round_=ROUND)),
        ("schedule-zero-steps", schedule_topic, "wrong-type", "FieldTypeError", "training.local_steps=0",
         "local_steps 0", train(local_steps=0)),
        ("schedule-nan-lr", schedule_topic, "nan-inf", "FieldTypeError", "training.learning_rate=nan",
         "learning rate NaN", train(learning_rate=float("nan"))),
        ("schedule-dropout-1.5", schedule_topic, "wrong-type", "FieldTypeError", "training.lora_dropout=1.5",
         "LoRA dropout 1.5", train(lora_dropout=1.5)),
        ("schedule-no-targets", schedule_topic, "wrong-type", "FieldTypeError", "training.target_modules",
         "no LoRA target modules", train(target_modules=[])),
        ("schedule-status-paused", schedule_topic, "wrong-type", "FieldTypeError", "status: must be one of",
         "status 'paused' (not in the Literal)",
         _pack(dict(msgpack.unpackb(schedule, raw=False), body=dict(to_plain(_schedule()), status="paused")))),
        ("schedule-negative-round", schedule_topic, "wrong-type", "FieldTypeError", "round=-3",
         "round -3", sched(round=-3)),
        ("schedule-infinite-deadline", schedule_topic, "nan-inf", "FieldTypeError", "deadline=inf",
         "deadline +Inf", sched(deadline=float("inf"))),
        ("schedule-blob-id-path", schedule_topic, "path", "FieldTypeError", "is not a sha256 hex blob id",
         "the schedule names blob id '../../x' for the tier", sched(manifests={TIER: "../../x"})),
        ("schedule-stale-round", schedule_topic, "stale", "stale", "schedule of round 0 after one of round 1",
         "a valid schedule of round 0 after round 1's", sched(round=0, status="waiting", participants={})),
        # -- manifests: paths outside the cache folder, and inconsistent ones
        manifest("manifest-dotdot", "evil1", ["../../../.bashrc"], "path", "UnsafePathError", "'..' component",
         "a file path climbing out with ../"),
        manifest("manifest-absolute", "evil2", ["/etc/cron.d/fedsoda"], "path", "UnsafePathError", "absolute",
         "an absolute file path"),
        manifest("manifest-inner-dotdot", "evil3", ["layers/../../../x"], "path", "UnsafePathError", "'..' component",
         "a path that climbs out from a subfolder"),
        manifest("manifest-backslash", "evil4", ["..\\..\\x"], "path", "UnsafePathError", "not a plain posix path",
         "a Windows-style path"),
        manifest("manifest-drive", "evil5", ["C:/Windows/x"], "path", "UnsafePathError", "not a plain posix path",
         "a path with a drive letter"),
        manifest("manifest-marker-name", "evil6", [".fedsoda_blob"], "path", "UnsafePathError", "reserved name",
         "a file named like the folder's completion marker"),
        manifest("manifest-blob-id-path", "evil7", ["a.bin"], "path",
         "UnsafePathError", "not a sha256 hex digest", "a blob id (the client's folder name) that climbs out", blob_id="../../../../tmp/fedsoda-escape"),
        manifest("manifest-file-and-dir", "evil8", ["a", "a/b"], "path", "UnsafePathError", "both a file and a directory",
         "'a' listed both as a file and as the folder of 'a/b'"),
        manifest("manifest-chunk-count", "evil9", ["a.bin"], "inconsistent", "BlobError", "needs 4 chunks",
         "4 bytes in 1-byte chunks but only one chunk listed", chunk_size=1),
        manifest("manifest-blob-id-mismatch", "evil10", ["a.bin"], "inconsistent", "BlobError",
         "does not match its file list", "a well-formed blob id that is not the file list's", blob_id="0" * 64),
        ("manifest-tier-mismatch", _topic("manifest", "L9"), "sender", "TopicError", "arrived on the topic of tier 'L9'",
         "a manifest of tier evil on the topic of tier L9", _encode(MessageType.MANIFEST, _manifest(["a.bin"]), sender=COORDINATOR)),
        manifest("manifest-stale-version", TIER, ["a.bin"], "stale", "stale", "manifest v0 of tier L2 after v1",
         "a valid manifest of tier L2, version 0, after version 1", version=0),
        manifest("manifest-no-model-config", "evil11", ["a.bin"], "inconsistent", "FieldTypeError", "model_config",
         "meta without the model config the preflight reads", meta={}),
        ("manifest-version-2.0", _topic("manifest", "evil12"), "version", "VersionError", "newer major",
         "a protocol 2.0 manifest", _pack(dict(_raw(MessageType.MANIFEST, _manifest(["a.bin"], tier="evil12"), sender=COORDINATOR), version="2.0"))),
        # -- global adapter
        ("adapter-nan", adapter_topic, "nan-inf", "TensorError", "holds NaN or Inf",
         "a global adapter with a NaN", adapter({KEY_QA: _tensor(_with(zeros.copy(), np.nan))}, round_=2)),
        ("adapter-int8", adapter_topic, "tensor", "TensorError", "has dtype int8",
         "an int8 global adapter", adapter({KEY_QA: _tensor(np.zeros((RANK, HIDDEN), np.int8))}, round_=2)),
        ("adapter-bad-key", adapter_topic, "shape-keys", "TensorError", "is not a LoRA weight key",
         "a global adapter key that is no LoRA weight", adapter({"lm_head.weight": _tensor(zeros)}, round_=2)),
        ("adapter-bytes-short", adapter_topic, "tensor", "TensorError", "needs 9216 bytes",
         "a global adapter tensor one byte short",
         _pack(dict(msgpack.unpackb(adapter({KEY_QA: _tensor(zeros)}, round_=2), raw=False),
                    body={"round": 2, "tensors": {KEY_QA: {"dtype": "float32", "shape": [RANK, HIDDEN], "data": zeros.tobytes()[:-1]}}}))),
        ("adapter-stale-round", adapter_topic, "stale", "stale", "global adapter of round -1 after one of round 0",
         "a valid (empty) global adapter of round -1 after round 0's", adapter({}, round_=-1)),
        ("adapter-unknown-type", adapter_topic, "unknown-type", "UnknownMessageTypeError", "'global_adapter_v2'",
         "type 'global_adapter_v2'", _pack(dict(msgpack.unpackb(adapter({}, round_=2), raw=False), type="global_adapter_v2"))),
        # -- assignment
        ("assign-garbage", assign_topic, "garbage", "MalformedMessageError", "not a valid msgpack", "0xc1 0xc1", b"\xc1\xc1"),
        ("assign-other-client", assign_topic, "sender", "TopicError", "for 'edge-2'",
         "an assignment for edge-2 on edge-1's topic", assignment(client_id="edge-2")),
        ("assign-from-mallory", assign_topic, "sender", "TopicError", "not from 'mallory'",
         "an assignment whose sender is 'mallory'", _encode(MessageType.ASSIGNMENT, Assignment(CLIENT, False, "", "go away", {}), sender="mallory")),
        ("assign-deep-plan", assign_topic, "deep-nesting", "FieldTypeError", "nested deeper than 32",
         "an assignment plan nested 100 levels",
         _splice_body(_raw(MessageType.ASSIGNMENT, Assignment(CLIENT, True, TIER, "", {}), sender=COORDINATOR), "plan",
                      b"\x81\xa1x" + _nested(100))),
        ("assign-bad-tier", assign_topic, "path", "FieldTypeError", "without a valid tier",
         "an accepted assignment to tier '../L2'", assignment(tier="../L2")),
        # -- nack
        ("nack-truncated", nack_topic, "truncated", "MalformedMessageError", "incomplete input", "a nack cut short",
         _encode(MessageType.NACK, Nack(CLIENT, 1, "", "late", "x"), sender=COORDINATOR)[:20]),
        ("nack-from-mallory", nack_topic, "sender", "TopicError", "not from 'mallory'",
         "a nack whose sender is 'mallory'", _encode(MessageType.NACK, Nack(CLIENT, 1, "", "late", "x"), sender="mallory")),
        ("nack-other-client", nack_topic, "sender", "TopicError", "for 'probe'",
         "a nack for probe on edge-1's topic", _encode(MessageType.NACK, Nack(PROBE, 1, "", "late", "x"), sender=COORDINATOR)),
        # -- chunks
        ("chunk-wrong-hash", chunk_topic, "chunk-hash", "ChunkHashMismatchError", "corrupt or forged",
         "data 'evil' named by the hash of 'good'", chunk(b"evil", hashlib.sha256(b"good").hexdigest())),
        ("chunk-empty-data", chunk_topic, "chunk-hash", "ChunkHashMismatchError", "(0 bytes)",
         "no data named by the hash of 'x'", chunk(b"", hashlib.sha256(b"x").hexdigest())),
        ("chunk-hash-not-hex", chunk_topic, "chunk-hash", "BlobError", "not a sha256 hex digest",
         "a chunk named '../../x'", chunk(b"x", "../../x")),
        ("chunk-from-mallory", chunk_topic, "sender", "TopicError", "not from 'mallory'",
         "a well-formed chunk whose sender is 'mallory'", chunk(b"x", hashlib.sha256(b"x").hexdigest(), sender="mallory")),
        ("chunk-nack-type", chunk_topic, "wrong-type", "TopicError", "carries chunk messages",
         "a nack sent on the chunk topic", _encode(MessageType.NACK, Nack(CLIENT, 1, "", "late", "x"), sender=COORDINATOR)),
    ]
    return out


def _with(values: np.ndarray, bad: float) -> np.ndarray:
    values.flat[5] = bad
    return values


def json_copy(raw: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a plain envelope (bytes stay bytes)."""
    return msgpack.unpackb(_pack(raw), raw=False)


def _splice_body(raw: dict[str, Any], field: str, value_bytes: bytes) -> bytes:
    """Pack ``raw`` with ``raw["body"][field]`` replaced by raw msgpack bytes."""
    marker = "@@splice@@"
    body = dict(raw["body"], **{field: marker})
    return _pack(dict(raw, body=body)).replace(_pack(marker), value_bytes, 1)


def _hello_raw(client: str, change: Callable[[dict[str, Any]], None]) -> bytes:
    raw = _raw(MessageType.HELLO, _hello(client), sender=client)
    change(raw["body"])
    return _pack(raw)


def build() -> list[Entry]:
    """Every corpus entry, in sending order (coordinator first, then client).

    Returns:
        The entries, named ``c001-...`` / ``k001-...``.
    """
    entries = []
    for prefix, target, rows in (("c", "coordinator", _coordinator_entries()), ("k", "client", _client_entries())):
        for i, (slug, topic, category, reason, detail, what, payload) in enumerate(rows, start=1):
            entries.append(Entry(f"{prefix}{i:03d}-{slug}", target, topic, category, reason, detail, what, payload))
    return entries


def index_json(entries: list[Entry]) -> str:
    """The text of index.json for ``entries``."""
    doc = {
        "run": RUN,
        "client": CLIENT,
        "probe": PROBE,
        "round": ROUND,
        "tier": TIER,
        "about": "Hostile messages; see tests/corpus/make_corpus.py. Each must be refused by its target "
        "and counted under 'reason', with 'detail' in the logged refusal.",
        "entries": [e.meta() for e in entries],
    }
    return json.dumps(doc, indent=1, ensure_ascii=True) + "\n"


def main() -> None:
    """Rewrite tests/corpus/messages/ and tests/corpus/index.json."""
    entries = build()
    shutil.rmtree(MESSAGES_DIR, ignore_errors=True)
    MESSAGES_DIR.mkdir(parents=True)
    for entry in entries:
        (MESSAGES_DIR / f"{entry.name}.bin").write_bytes(entry.payload)
    INDEX_FILE.write_text(index_json(entries))
    targets = {t: sum(e.target == t for e in entries) for t in ("coordinator", "client")}
    print(f"wrote {len(entries)} messages ({targets}) to {MESSAGES_DIR} and {INDEX_FILE}")


if __name__ == "__main__":
    main()
