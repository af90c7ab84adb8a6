"""Ed25519 signatures on envelopes: the coordinator signs, clients verify against a pinned key.

Nothing on an open broker stops a stranger from publishing on the coordinator's topics, so
the ``sender`` field proves nothing. From protocol 1.3 the coordinator signs every message
it publishes and a client refuses any message on a coordinator topic that the key it pinned
did not sign. Clients sign what they send with keys of their own too: the hello carries the
public key, and once the coordinator pinned it (at the client's first accepted hello, or
from the credentials registry) it refuses what that key did not sign in the client's name.

Wire form: a signed envelope is the msgpack map of an unsigned one with one more header
entry, ``signature`` (64 bytes), packed as its *first* key, so the signature sits at a
fixed offset and is checked before msgpack parses a single byte a stranger may have
written::

    0x8N  0xa9 "signature"  0xc4 0x40  <64 signature bytes>  <the other N-1 entries>

The signed message is ``b"fedsoda-envelope-v1\\0" + sha256(payload with those 64 bytes
zeroed)``: the signature covers every other byte of the payload (header, body, chunk data).
The hash is fed the payload in three pieces (the frame head, 64 zero bytes, the rest), so a
4 MiB chunk is hashed where it lies, never copied. Unsigned messages (clients, peers older
than 1.3) simply have no ``signature`` entry; a 1.2 peer drops the field it does not know
with one warning.

Keys: the coordinator's private key is a PKCS#8 PEM file created on first use (mode 0600,
written atomically and never replaced); its public key travels as text,
``ed25519:<base64 of the 32 raw bytes>``, in the file ``coordinator.pub`` next to it, in a
client's credentials file (``coordinator_key``) or on ``fedsoda-client join --coordinator-key``.

Only this module builds or checks signatures; :mod:`shared.codec` calls it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.errors import ConfigError, SignatureError

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview

KEY_PREFIX = "ed25519:"
"""How a public key's text starts."""

PRIVATE_KEY_PREFIX = "ed25519-private:"
"""How a private key's text starts (a client's key in its credentials file)."""

PUBLIC_KEY_FILE = "coordinator.pub"
"""The public key's file name, next to the private key file."""

SIGNATURE_FIELD = "signature"
"""The envelope header field that holds the signature."""

SIGNATURE_BYTES = 64
"""Length of an Ed25519 signature."""

_DOMAIN = b"fedsoda-envelope-v1\0"
# fixstr of 9 characters ("signature"), then bin8 of 64 bytes.
_SIGNATURE_ENTRY = b"\xa9" + SIGNATURE_FIELD.encode() + b"\xc4" + bytes([SIGNATURE_BYTES])
_SIGNATURE_AT = 1 + len(_SIGNATURE_ENTRY)
"""Offset of the 64 signature bytes: after the fixmap byte and the entry's key and bin8 header."""
SIGNED_HEAD_BYTES = _SIGNATURE_AT + SIGNATURE_BYTES
"""Bytes of a signed payload before its first unsigned-envelope entry (77)."""
_ZERO_SIGNATURE = bytes(SIGNATURE_BYTES)
_MAX_FIXMAP = 15


class VerifyKey:
    """A pinned public Ed25519 key: the coordinator's (clients pin it) or a client's (the coordinator pins it).

    Args:
        key: The public key.
        owner: Whose key it is, for refusals: ``"coordinator"`` or ``"client <id>"``.
    """

    def __init__(self, key: Ed25519PublicKey, owner: str = "coordinator") -> None:
        self._key = key
        self.owner = owner
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.text = KEY_PREFIX + base64.b64encode(raw).decode()
        """``ed25519:<base64>``: how the key is written down and handed out."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __repr__(self) -> str:
        return f"VerifyKey({self.text!r})"

    def verify(self, payload: Buffer) -> None:
        """Check that ``payload`` is an envelope signed by this key.

        Args:
            payload: The received bytes (size-capped by the caller).

        Raises:
            SignatureError: The payload carries no signature in its first header field, or
                the signature does not verify (forged, altered, or signed by another key).
        """
        view = memoryview(payload)
        coordinator = self.owner == "coordinator"
        if not _is_signed(view):
            raise SignatureError(
                f"message is not signed, and messages on this topic must carry the {self.owner}'s signature "
                f"(a stranger's message, or {'a coordinator' if coordinator else 'a client'} older than protocol 1.3)"
            )
        try:
            self._key.verify(bytes(view[_SIGNATURE_AT:SIGNED_HEAD_BYTES]), _signed_message(view[:_SIGNATURE_AT], view[SIGNED_HEAD_BYTES:]))
        except InvalidSignature:
            rotated = (
                f"if the coordinator's key was replaced, pin its new {PUBLIC_KEY_FILE}" if coordinator
                else "the key was pinned at its first accepted hello, or from the credentials registry"
            )
            raise SignatureError(
                f"signature does not verify against the pinned {self.owner} key {self.text}: the message was forged "
                f"or altered, or another key signed it ({rotated})"
            ) from None


class SigningKey:
    """A private Ed25519 key: the coordinator's or a client's, which signs everything its owner sends.

    Args:
        key: The private key.
    """

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = VerifyKey(key.public_key())
        """Its public key, which clients pin."""

    @property
    def private_text(self) -> str:
        """``ed25519-private:<base64 of the 32-byte seed>``: a client's key as its credentials file carries it (secret)."""
        raw = self._key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
        return PRIVATE_KEY_PREFIX + base64.b64encode(raw).decode()

    @classmethod
    def from_private_text(cls, text: str) -> SigningKey:
        """The key written by :attr:`private_text`.

        Raises:
            ConfigError: Not an ``ed25519-private:<base64>`` key of 32 bytes.
        """
        return cls.from_seed(_key_bytes(text.strip(), PRIVATE_KEY_PREFIX, "private key", "an Ed25519 key"))

    @classmethod
    def generate(cls) -> SigningKey:
        """A fresh random key (tests; :func:`load_or_create_signing_key` for a coordinator's)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        """The key of a 32-byte seed: a fixed key for golden samples and the test corpus.

        Args:
            seed: 32 bytes.

        Returns:
            The key (Ed25519 signatures are deterministic, so its signatures are too).
        """
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public.text!r})"

    def sign_packed(self, parts: Sequence[Buffer]) -> list[Buffer]:
        """Sign a packed unsigned envelope, given as pieces to join (large values spliced in).

        Args:
            parts: The unsigned envelope's bytes in order; the first piece starts with its
                msgpack fixmap byte (an envelope has far fewer than 15 entries).

        Returns:
            The signed envelope's pieces, to ``b"".join``: a new 77-byte head (map byte with
            one entry more, the signature entry) followed by the input less its map byte, not
            copied.

        Raises:
            ValueError: The first piece does not start with a fixmap of fewer than 15 entries.
        """
        first = memoryview(parts[0])
        if not first or not 0x80 <= first[0] < 0x80 + _MAX_FIXMAP:
            raise ValueError("an envelope to sign must be a msgpack fixmap of fewer than 15 entries")
        map_byte = bytes([first[0] + 1])
        rest = [first[1:], *parts[1:]]
        signature = self._key.sign(_signed_message(map_byte + _SIGNATURE_ENTRY, *rest))
        return [map_byte + _SIGNATURE_ENTRY + signature, *rest]


def _is_signed(view: memoryview) -> bool:
    # The map byte counts the signature entry and at least one more.
    return (
        len(view) >= SIGNED_HEAD_BYTES
        and 0x81 < view[0] <= 0x80 + _MAX_FIXMAP
        and view[1:_SIGNATURE_AT] == _SIGNATURE_ENTRY
    )


def _signed_message(head: Buffer, *rest: Buffer) -> bytes:
    """The bytes an envelope's signature covers: the domain tag and the zero-signature payload's sha256."""
    digest = hashlib.sha256(head)
    digest.update(_ZERO_SIGNATURE)
    for piece in rest:
        digest.update(piece)
    return _DOMAIN + digest.digest()


def parse_verify_key(value: str, *, owner: str = "coordinator") -> VerifyKey:
    """A public key from its text (``ed25519:<base64>``) or from a file holding that text.

    Args:
        value: The key's text, or a path to a file with it (``coordinator.pub``).
        owner: Whose key it is (:class:`VerifyKey`).

    Returns:
        The key.

    Raises:
        ConfigError: Neither a well-formed key nor a readable file with one (the message says which).
    """
    text = value.strip()
    if not text.startswith(KEY_PREFIX):
        path = Path(text).expanduser()  # a local option's value: never a path taken from the wire
        try:
            text = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"coordinator key {value!r} is neither an '{KEY_PREFIX}<base64>' key nor a readable file ({exc.strerror})"
            ) from None
        if not text.startswith(KEY_PREFIX):
            raise ConfigError(f"{owner} key file {path} does not hold an '{KEY_PREFIX}<base64>' key")
    return key_from_text(text, owner=owner)


def key_from_text(text: str, *, owner: str) -> VerifyKey:
    """A public key from its text, ``ed25519:<base64>``, and nothing else (a key from the wire is no file name).

    Args:
        text: The key's text.
        owner: Whose key it is (:class:`VerifyKey`).

    Returns:
        The key.

    Raises:
        ConfigError: Not ``ed25519:`` and the base64 of 32 bytes.
    """
    raw = _key_bytes(text, KEY_PREFIX, f"{owner} key {_short(text)}", "an Ed25519 public key")
    return VerifyKey(Ed25519PublicKey.from_public_bytes(raw), owner)


def _key_bytes(text: str, prefix: str, what: str, kind: str) -> bytes:
    """The 32 bytes of a key written as ``<prefix><base64>`` (``what`` and ``kind`` name it in errors).

    Raises:
        ConfigError: Another prefix, bad base64, or not 32 bytes.
    """
    if not text.startswith(prefix):
        raise ConfigError(f"{what} does not start with '{prefix}'")
    try:
        raw = base64.b64decode(text[len(prefix):], validate=True)
    except binascii.Error:
        raise ConfigError(f"{what} is not valid base64 after '{prefix}'") from None
    if len(raw) != 32:
        raise ConfigError(f"{what} holds {len(raw)} bytes; {kind} has 32")
    return raw


def _short(text: str) -> str:
    """``text`` quoted, cut to 80 characters (keys from the wire may be anything)."""
    return repr(text[:80] + ("..." if len(text) > 80 else ""))


def public_key_file(key_file: str | os.PathLike[str]) -> Path:
    """Where the public key of the private key in ``key_file`` is written: ``coordinator.pub`` beside it."""
    return Path(key_file).with_name(PUBLIC_KEY_FILE)


def load_or_create_signing_key(path: str | os.PathLike[str], *, write_public: bool = True) -> SigningKey:
    """A signing key from ``path`` (the coordinator's, or a client's), created there (mode 0600) if absent.

    A new key is written to a private temporary file and linked into place, which fails if
    another process created the key meanwhile; then that one is used, so two processes
    never end up with different keys. An existing key file is never replaced. The public
    key is (re)written to ``coordinator.pub`` beside it, unless ``write_public`` is False (a
    client's key, whose public key travels in its hello).

    Args:
        path: The private key file (PKCS#8 PEM).
        write_public: Write ``coordinator.pub`` beside it.

    Returns:
        The key.

    Raises:
        ConfigError: The file cannot be read or written, or holds no Ed25519 private key.
    """
    path = Path(path).expanduser()
    try:
        if not path.exists():
            _create_key_file(path)
        data = path.read_bytes()
        mode = path.stat().st_mode & 0o777
    except OSError as exc:
        raise ConfigError(f"cannot read or create the coordinator signing key {path}: {exc}") from None
    if mode & 0o077:
        log.warning("signing key %s can be read by other users (mode %o): chmod 600 it", path, mode)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path} holds a {type(private).__name__}, not an Ed25519 private key")
    key = SigningKey(private)
    if not write_public:
        return key
    pub = public_key_file(path)
    text = key.public.text + "\n"
    try:
        if not pub.is_file() or pub.read_text() != text:
            _write_atomically(pub, text.encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write the coordinator's public key to {pub}: {exc}") from None
    return key


def _create_key_file(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)  # never replaces: a key another process just made wins
            log.info("created the coordinator signing key %s", path)
        except FileExistsError:
            pass
    finally:
        Path(tmp).unlink(missing_ok=True)


def _write_atomically(path: Path, data: bytes, *, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
