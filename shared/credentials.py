"""Broker credentials as a device receives them, and mosquitto's password hashes.

``fedsoda-coordinator credentials add CLIENT_ID`` writes one :class:`ClientCredentials`
file per device; ``fedsoda-client join --credentials FILE`` reads it, so the password never
appears on a command line (where ``ps`` and shell history would show it). The file is TOML::

    client_id = "jetson-07"
    username = "jetson-07"
    password = "..."
    broker = "coordinator.example:8883"
    coordinator_key = "ed25519:..."
    ca_pem = '''
    -----BEGIN CERTIFICATE-----
    ...
    '''

``ca_pem`` (optional) is the CA certificate the broker's TLS certificate is signed with,
embedded so a device needs this one file only. ``coordinator_key`` is the coordinator's
public signing key (:mod:`shared.signing`): the client pins it and refuses any message on a
coordinator topic that it did not sign.

Password hashes use mosquitto 2's ``$7$`` format (PBKDF2-SHA512), computed here with
:mod:`hashlib`, so no mosquitto tools are needed on the machine that issues credentials.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from shared.config import load_config
from shared.errors import ConfigError, TopicError
from shared.signing import KEY_PREFIX, SigningKey, parse_verify_key
from shared.topics import check_id

MOSQUITTO_SALT_BYTES = 12
"""Salt length mosquitto_passwd uses (its ``SALT_LEN``)."""

MOSQUITTO_DEFAULT_ITERATIONS = 101
"""mosquitto_passwd's default PBKDF2 iteration count.

Enough here: fedsoda's passwords are 192-bit random tokens, which no amount of guessing
recovers from a leaked hash, and a low count keeps every broker login cheap.
"""


def generate_password() -> str:
    """A new random password: 32 URL-safe characters (192 bits).

    Returns:
        The password.
    """
    return secrets.token_urlsafe(24)


def mosquitto_password_hash(password: str, *, salt: bytes | None = None, iterations: int = MOSQUITTO_DEFAULT_ITERATIONS) -> str:
    """Hash a password for a mosquitto 2 password file (``$7$``: PBKDF2-SHA512).

    The line in the file is ``username:<this hash>``, exactly as ``mosquitto_passwd`` writes it.

    Args:
        password: The plaintext password.
        salt: Salt bytes; a fresh random 12-byte salt by default.
        iterations: PBKDF2 iterations.

    Returns:
        ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512 digest>``.
    """
    salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class ClientCredentials:
    """What one MQTT user needs to log in to the broker.

    Attributes:
        client_id: fedsoda client id (also the MQTT client id).
        username: Broker user name (fedsoda issues it equal to ``client_id``).
        password: Broker password (plaintext: keep the file private).
        broker: ``HOST:PORT`` the device dials ("" = say it with ``--broker``).
        ca_pem: PEM of the CA that signed the broker's TLS certificate ("" = plaintext).
        coordinator_key: The coordinator's public key, ``ed25519:<base64>`` ("" = none: the
            client must be given it with ``--coordinator-key``).
        client_key: The client's own private signing key, ``ed25519-private:<base64>`` ("" =
            the client makes one in its state folder); the registry holds its public key, so
            the coordinator knows it before the first hello.
    """

    client_id: str
    username: str
    password: str
    broker: str = ""
    ca_pem: str = ""
    coordinator_key: str = ""
    client_key: str = ""

    def __post_init__(self) -> None:
        problems = []
        try:
            check_id(self.client_id, "client_id")
        except TopicError as exc:
            problems.append(str(exc))
        if not self.username or not self.password:
            problems.append("username and password must not be empty")
        if self.ca_pem and "-----BEGIN CERTIFICATE-----" not in self.ca_pem:
            problems.append("ca_pem is not a PEM certificate")
        if self.coordinator_key and not self.coordinator_key.startswith(KEY_PREFIX):
            # The key itself, never a file name: the file must be self-contained.
            problems.append(f"coordinator_key must be an '{KEY_PREFIX}<base64>' key")
        elif self.coordinator_key:
            try:
                parse_verify_key(self.coordinator_key)
            except ConfigError as exc:
                problems.append(str(exc))
        if self.client_key:
            try:
                SigningKey.from_private_text(self.client_key)
            except ConfigError as exc:
                problems.append(f"client_key: {exc}")
        if problems:
            raise ConfigError("; ".join(problems))

    def ca_file(self, folder: Path) -> Path | None:
        """Write :attr:`ca_pem` to ``folder/broker-ca.pem`` for the TLS library.

        Args:
            folder: Where to put it (the client's state folder).

        Returns:
            The file, or None when the credentials carry no CA (plaintext).
        """
        if not self.ca_pem:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "broker-ca.pem"
        path.write_text(self.ca_pem)
        return path


def load_client_credentials(path: str | os.PathLike[str]) -> ClientCredentials:
    """Read a credentials file written by ``fedsoda-coordinator credentials add``.

    Args:
        path: The TOML file.

    Returns:
        The credentials.

    Raises:
        ConfigError: Missing, not TOML, an unknown or missing key, or an invalid value
            (the message names the file and the key).
    """
    try:
        # No environment layer: FEDSODA_PASSWORD is join's own --password variable.
        return load_config(ClientCredentials, path, env={})
    except ConfigError as exc:
        raise ConfigError(f"credentials file {path}: {exc}") from None


def write_client_credentials(path: str | os.PathLike[str], credentials: ClientCredentials, *, comment: str = "") -> Path:
    """Write a credentials file readable by its owner only (mode 0600), atomically.

    Args:
        path: Destination.
        credentials: What to write.
        comment: Lines put at the top as TOML comments.

    Returns:
        The path written.
    """
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    optional = tuple(k for k in ("coordinator_key", "client_key") if getattr(credentials, k))
    keys = ("client_id", "username", "password", "broker", *optional)
    for key in keys:
        lines.append(f"{key} = {json.dumps(getattr(credentials, key))}")  # a JSON string is a TOML basic string
    if credentials.ca_pem:
        # A literal multi-line string keeps the PEM readable (a PEM never contains ''').
        lines.append(f"ca_pem = '''\n{credentials.ca_pem.strip()}\n'''")
    return write_private(Path(path), "\n".join(lines) + "\n")


def write_private(path: Path, text: str) -> Path:
    """Replace ``path`` with ``text`` atomically, readable by its owner only.

    A reader (mosquitto reloading its password file) never sees half a file, and the
    secret is never world-readable, not even for an instant.

    Args:
        path: Destination.
        text: Content.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp creates it 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
