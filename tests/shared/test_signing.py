"""Envelope signatures (shared.signing through shared.codec), key files and key resolution."""

from __future__ import annotations

import hashlib
import logging
import stat
from pathlib import Path

import msgpack
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from coordinator.run.credentials import CredentialStore, signing_key_file
from coordinator.settings import BrokerSettings
from shared import codec, topics
from shared.credentials import (
    ClientCredentials,
    load_client_credentials,
    write_client_credentials,
)
from shared.errors import ConfigError, MalformedMessageError, SignatureError
from shared.protocol import PROTOCOL_VERSION, Chunk, MessageType, Schedule
from shared.signing import (
    PUBLIC_KEY_FILE,
    SIGNED_HEAD_BYTES,
    SigningKey,
    load_or_create_signing_key,
    parse_verify_key,
)
from tests.shared.samples import (
    GOLDEN_SIGNING_SEED,
    RUN,
    SENDER,
    newer_samples,
    samples,
    signed_samples,
)

GOLDEN_DIR = Path(__file__).parent / "golden"
KEY = SigningKey.from_seed(b"test_signing coordinator key...!")
OTHER = SigningKey.from_seed(b"test_signing another key........")


def _signed(msg_type: MessageType, body: object, key: SigningKey = KEY) -> bytes:
    return codec.encode(msg_type, body, run=RUN, round=3, sender="coordinator", signer=key)


@pytest.mark.parametrize("msg_type", list(MessageType))
def test_every_message_type_round_trips_signed(msg_type: MessageType) -> None:
    data = _signed(msg_type, samples()[msg_type])
    assert data[0] == 0x89 and data[1:11] == b"\xa9signature"
    env = codec.decode(data, verify_key=KEY.public)
    assert env.body == samples()[msg_type] and env.version == PROTOCOL_VERSION == "1.3"
    assert codec.decode(data) == env  # unpinned (the coordinator's own reading): the field is simply known


def test_flipping_any_single_byte_breaks_the_signature() -> None:
    # A chunk message: every byte of the map header, the signature, the envelope header and the data.
    data = _signed(MessageType.CHUNK, samples()[MessageType.CHUNK])
    for i in range(len(data)):
        tampered = bytearray(data)
        tampered[i] ^= 0x01
        with pytest.raises(SignatureError):
            codec.decode(bytes(tampered), verify_key=KEY.public)


def test_tampered_spliced_chunk_data_header_and_body_fail() -> None:
    # 4 MiB of chunk data: the codec splices it in after signing; the signature still covers it.
    blob = bytes(range(256)) * (4 * 4096)
    data = _signed(MessageType.CHUNK, Chunk(blob_id="a" * 64, hash=hashlib.sha256(blob).hexdigest(), data=blob))
    assert codec.decode(data, verify_key=KEY.public).body.data == blob
    header_at = data.index(RUN.encode())  # the run id in the envelope header
    body_at = data.index(b"a" * 64)  # the blob id in the body
    for at in (header_at, body_at, len(data) - len(blob), len(data) // 2, len(data) - 1):
        tampered = bytearray(data)
        tampered[at] ^= 0x80
        with pytest.raises(SignatureError, match="does not verify"):
            codec.decode(bytes(tampered), verify_key=KEY.public)


def test_another_key_and_an_unsigned_message_are_refused_when_a_key_is_pinned() -> None:
    body = samples()[MessageType.SCHEDULE]
    with pytest.raises(SignatureError, match=f"does not verify against the pinned coordinator key {KEY.public.text}"):
        codec.decode(_signed(MessageType.SCHEDULE, body, OTHER), verify_key=KEY.public)
    unsigned = codec.encode(MessageType.SCHEDULE, body, run=RUN, round=3, sender="coordinator")
    with pytest.raises(SignatureError, match="not signed"):
        codec.decode(unsigned, verify_key=KEY.public)
    assert codec.decode(unsigned).body == body  # nothing pinned: unsigned still decodes


def test_the_signature_is_checked_before_msgpack_reads_the_bytes() -> None:
    # Garbage after a well-formed signature frame: refused as forged, never parsed.
    head = _signed(MessageType.NACK, samples()[MessageType.NACK])[:SIGNED_HEAD_BYTES]
    with pytest.raises(SignatureError):
        codec.decode(head + b"\xc1" * 40, verify_key=KEY.public)
    with pytest.raises(MalformedMessageError):
        codec.decode(head + b"\xc1" * 40)  # the same bytes unpinned reach the parser
    for garbage in (b"", b"\x89", b"\xc1garbage", b"\x80"):
        with pytest.raises(SignatureError, match="not signed"):
            codec.decode(garbage, verify_key=KEY.public)


def test_decode_message_verifies_after_the_topic_and_the_size_cap() -> None:
    data = _signed(MessageType.SCHEDULE, samples()[MessageType.SCHEDULE])
    info, env = codec.decode_message(topics.schedule(RUN), data, run=RUN, verify_key=KEY.public)
    assert info.kind is topics.TopicKind.SCHEDULE and isinstance(env.body, Schedule)
    with pytest.raises(SignatureError):
        codec.decode_message(topics.schedule(RUN), data, run=RUN, verify_key=OTHER.public)
    from shared.errors import PayloadTooLargeError

    with pytest.raises(PayloadTooLargeError):  # a huge forgery is not hashed
        codec.decode_message(topics.schedule(RUN), data, run=RUN, max_bytes=100, verify_key=KEY.public)


def test_signatures_are_deterministic() -> None:
    body = samples()[MessageType.SCHEDULE]
    fixed = dict(run=RUN, round=1, sender="coordinator", message_id="0" * 32, timestamp=1.0, signer=KEY)
    assert codec.encode(MessageType.SCHEDULE, body, **fixed) == codec.encode(MessageType.SCHEDULE, body, **fixed)


@pytest.mark.parametrize("stem", sorted(signed_samples()))
def test_signed_golden_samples_verify_and_decode(stem: str) -> None:
    msg_type, body = signed_samples()[stem]
    data = (GOLDEN_DIR / f"{stem}.msgpack").read_bytes()
    golden_key = SigningKey.from_seed(GOLDEN_SIGNING_SEED).public
    env = codec.decode(data, verify_key=golden_key)
    assert env.type is msg_type and env.body == body and env.version == "1.3" and env.sender == SENDER
    with pytest.raises(SignatureError):
        codec.decode(data, verify_key=KEY.public)


def test_a_1_2_decoder_drops_the_signature_field_with_one_warning(monkeypatch, caplog) -> None:
    # A 1.2 peer knows the header fields of its day only: the signature is an unknown extra field.
    monkeypatch.setattr(codec, "_HEADER_FIELDS", tuple(f for f in codec._HEADER_FIELDS if f != "signature"))
    monkeypatch.setattr(codec, "_warned_unknown", set())
    caplog.set_level(logging.WARNING, logger="shared.codec")
    data = (GOLDEN_DIR / "signed-schedule-1.3.msgpack").read_bytes()
    assert codec.decode(data).body == signed_samples()["signed-schedule-1.3"][1]
    warnings = [r.getMessage() for r in caplog.records if "unknown field" in r.getMessage()]
    assert len(warnings) == 1 and "'signature'" in warnings[0]


def test_1_2_messages_still_decode_and_are_refused_only_when_a_key_is_pinned() -> None:
    data = (GOLDEN_DIR / "schedule-1.2.msgpack").read_bytes()
    assert codec.decode(data).body == newer_samples()["schedule-1.2"][1]
    with pytest.raises(SignatureError, match="not signed"):
        codec.decode(data, verify_key=KEY.public)


def test_a_signature_field_later_in_the_map_does_not_count() -> None:
    # Only the first entry is the signature: one appended elsewhere (with a valid signature's bytes) is not.
    good = _signed(MessageType.NACK, samples()[MessageType.NACK])
    raw = msgpack.unpackb(good, raw=False)
    moved = {k: v for k, v in raw.items() if k != "signature"} | {"signature": raw["signature"]}
    with pytest.raises(SignatureError, match="not signed"):
        codec.decode(msgpack.packb(moved, use_bin_type=True), verify_key=KEY.public)


# --------------------------------------------------------------------------- key files


def test_a_key_file_is_created_private_once_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "coordinator.key"
    key = load_or_create_signing_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    pub = tmp_path / "keys" / PUBLIC_KEY_FILE
    assert pub.read_text() == key.public.text + "\n" and key.public.text.startswith("ed25519:")
    assert load_or_create_signing_key(path).public == key.public  # reused, not regenerated
    pub.write_text("stale\n")
    assert load_or_create_signing_key(path).public == key.public and pub.read_text() == key.public.text + "\n"
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_key_files_that_are_not_ed25519_private_keys_are_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.key"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="not an unencrypted PEM private key"):
        load_or_create_signing_key(bad)
    ec = tmp_path / "ec.key"
    ec.write_bytes(generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    with pytest.raises(ConfigError, match="not an Ed25519 private key"):
        load_or_create_signing_key(ec)


def test_a_public_key_parses_from_its_text_or_a_file(tmp_path: Path) -> None:
    text = KEY.public.text
    assert parse_verify_key(text) == KEY.public and parse_verify_key(f"  {text}\n") == KEY.public
    pub = tmp_path / "coordinator.pub"
    pub.write_text(text + "\n")
    assert parse_verify_key(str(pub)) == KEY.public
    with pytest.raises(ConfigError, match="neither an 'ed25519:<base64>' key nor a readable file"):
        parse_verify_key(str(tmp_path / "missing.pub"))
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(ConfigError, match="does not hold an 'ed25519:<base64>' key"):
        parse_verify_key(str(tmp_path / "junk.pub"))
    with pytest.raises(ConfigError, match="not valid base64"):
        parse_verify_key("ed25519:@@@@")
    with pytest.raises(ConfigError, match="holds 3 bytes"):
        parse_verify_key("ed25519:AAAA")


def test_where_the_signing_key_lives(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    creds = tmp_path / "creds"
    assert signing_key_file(BrokerSettings(mode="embedded"), run_dir) == run_dir / "coordinator.key"
    assert signing_key_file(BrokerSettings(mode="external"), run_dir) == run_dir / "coordinator.key"
    assert signing_key_file(BrokerSettings(mode="external", credentials_dir=str(creds)), run_dir) == creds / "coordinator-signing.key"
    assert signing_key_file(BrokerSettings(mode="mosquitto", credentials_dir=str(creds)), run_dir) == creds / "coordinator-signing.key"
    chosen = tmp_path / "mine.key"
    assert signing_key_file(BrokerSettings(mode="mosquitto", signing_key=str(chosen)), run_dir) == chosen


def test_credentials_carry_the_coordinator_key_of_their_folder(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "creds")
    creds = store.add("alice", broker="h:1")
    assert creds.coordinator_key == store.signing_key().public.text
    assert (tmp_path / "creds" / PUBLIC_KEY_FILE).read_text().strip() == creds.coordinator_key
    path = write_client_credentials(tmp_path / "alice.toml", creds)
    assert f'coordinator_key = "{creds.coordinator_key}"' in path.read_text()
    assert load_client_credentials(path) == creds
    with pytest.raises(ConfigError, match="coordinator_key must be an 'ed25519:<base64>' key"):
        ClientCredentials("bob", "bob", "pw", coordinator_key="/tmp/coordinator.pub")
    with pytest.raises(ConfigError, match="holds 3 bytes"):
        ClientCredentials("bob", "bob", "pw", coordinator_key="ed25519:AAAA")


def test_a_client_key_travels_as_private_text_and_a_wire_key_is_never_a_file_name(tmp_path: Path) -> None:
    from shared.signing import key_from_text

    assert SigningKey.from_private_text(KEY.private_text).public == KEY.public
    with pytest.raises(ConfigError, match="ed25519-private:"):
        SigningKey.from_private_text(KEY.public.text)
    with pytest.raises(ConfigError, match="holds 3 bytes"):
        SigningKey.from_private_text("ed25519-private:AAAA")
    pub = tmp_path / "coordinator.pub"
    pub.write_text(KEY.public.text)
    with pytest.raises(ConfigError, match="does not start with 'ed25519:'"):
        key_from_text(str(pub), owner="client x")  # parse_verify_key would read it; a key from the wire must not
    key = key_from_text(OTHER.public.text, owner="client x")
    with pytest.raises(SignatureError, match="pinned client x key .*first accepted hello"):
        codec.decode(_signed(MessageType.NACK, samples()[MessageType.NACK]), verify_key=key)


def test_credentials_add_issues_each_client_a_key_whose_public_half_the_registry_keeps(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "creds")
    alice, bob = store.add("alice"), store.add("bob")
    assert alice.client_key.startswith("ed25519-private:") and alice.client_key != bob.client_key
    expected = {c.client_id: SigningKey.from_private_text(c.client_key).public.text for c in (alice, bob)}
    assert store.client_public_keys() == expected
    assert alice.client_key not in (tmp_path / "creds" / "clients.json").read_text()  # only the public half is kept
    store.revoke("bob")
    assert set(store.client_public_keys()) == {"alice"}
    path = write_client_credentials(tmp_path / "alice.toml", alice)
    assert load_client_credentials(path).client_key == alice.client_key
    with pytest.raises(ConfigError, match="client_key: private key holds 3 bytes"):
        ClientCredentials("carol", "carol", "pw", client_key="ed25519-private:AAAA")
