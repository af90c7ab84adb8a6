"""The broker a run uses: your own, the embedded one, or a local mosquitto on the credentials folder.

:func:`broker_for` starts what ``broker.mode`` asks for (and stops it after the run) and says
how the coordinator logs in; :mod:`coordinator.launch` connects the server through it.

The coordinator's MQTT client id is not its envelope sender name (``coordinator``): a broker
hands a persistent session, and the QoS 1 messages queued in it, to whoever connects with its
client id, so a guessable id lets a stranger take the coordinator's session over and swallow
the clients' updates. :func:`coordinator_client_id` draws ``coordinator-<128-bit hex>`` once
per run and keeps it in the run folder, so a resumed coordinator gets its session back. On the
local mosquitto the broker forces each login's user name as its client id; there the
coordinator's password is what protects the session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from coordinator.run.credentials import CredentialStore
from coordinator.settings import BrokerSettings
from shared.broker import BrokerHandle
from shared.embedded_broker import start_embedded_broker
from shared.errors import RunStateError
from shared.mosquitto import start_mosquitto
from shared.protocol import COORDINATOR_ID
from shared.transport_types import TransportConfig

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

CLIENT_ID_FILE = "coordinator-mqtt-id"
"""The run folder's file holding the coordinator's MQTT client id (mode 0600)."""
_CLIENT_ID_RE = re.compile(rf"{COORDINATOR_ID}-[0-9a-f]{{32}}")


def new_coordinator_client_id() -> str:
    """A fresh unguessable MQTT client id for the coordinator.

    Returns:
        ``coordinator-`` followed by 128 random bits in hex.
    """
    return f"{COORDINATOR_ID}-{secrets.token_hex(16)}"


def coordinator_client_id(run_dir: Path) -> str:
    """The coordinator's MQTT client id for this run: drawn on first use, then read back.

    Reusing it after a restart lets the broker hand the resumed coordinator its persistent
    session, with the updates clients sent while it was down.

    Args:
        run_dir: The run folder (exists).

    Returns:
        The client id.

    Raises:
        RunStateError: The file exists but does not hold such an id.
    """
    path = Path(run_dir) / CLIENT_ID_FILE
    if path.is_file():
        client_id = path.read_text().strip()
        if not _CLIENT_ID_RE.fullmatch(client_id):
            raise RunStateError(
                f"{path} does not hold a coordinator MQTT client id ({COORDINATOR_ID}-<32 hex digits>); "
                "delete it to draw a new one (the broker's session of the old id is then lost)"
            )
        return client_id
    client_id = new_coordinator_client_id()
    # Whoever reads it can take the session over, like a password: owner only. O_EXCL: two
    # coordinators started on one folder at once must not end up with different ids.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return coordinator_client_id(run_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(client_id + "\n")
    return client_id


def transport_config(broker: BrokerSettings, host: str, port: int, client_id: str) -> TransportConfig:
    """A TransportConfig from broker settings (empty strings mean "not set").

    Args:
        broker: Credentials and TLS files.
        host: Broker host.
        port: Broker port.
        client_id: MQTT client id.

    Returns:
        The transport configuration.
    """
    return TransportConfig(
        host=host,
        port=port,
        client_id=client_id,
        username=broker.username or None,
        password=broker.password or None,
        ca_file=Path(broker.ca_file) if broker.ca_file else None,
        cert_file=Path(broker.cert_file) if broker.cert_file else None,
        key_file=Path(broker.key_file) if broker.key_file else None,
    )


@dataclass(frozen=True)
class BrokerEndpoint:
    """The broker a run uses.

    Attributes:
        host: Where clients connect.
        port: Where clients connect.
        coordinator: How the coordinator connects (address, login, TLS).
    """

    host: str
    port: int
    coordinator: TransportConfig


@contextlib.contextmanager
def broker_for(
    settings: BrokerSettings, progress: Progress, workdir: Path | None = None, *, client_id: str | None = None
) -> Iterator[BrokerEndpoint]:
    """Yield the broker to use, starting one for the block if ``settings.mode`` asks for it.

    Args:
        settings: Broker settings.
        progress: Status messages.
        workdir: Folder for a started mosquitto's config, log and persistence (a temp folder
            if None).
        client_id: The coordinator's MQTT client id (:func:`coordinator_client_id`); None
            draws a fresh one. The local mosquitto ignores it: it uses the login's user name.

    Yields:
        The broker's endpoint.

    Raises:
        BrokerError: The broker could not be started.
        ConfigError: Bad credentials folder.
    """
    client_id = client_id or new_coordinator_client_id()
    if settings.mode == "external":
        # A broker of yours with use_username_as_clientid replaces the id with the user name.
        login = transport_config(settings, settings.host, settings.port, client_id)
        if settings.credentials_dir and not settings.username:
            # Your own broker on the credentials folder's passwd and acl: log in as their coordinator.
            own = CredentialStore(settings.credentials_dir).coordinator_credentials()
            login = dataclasses.replace(login, username=own.username, password=own.password)
        yield BrokerEndpoint(settings.host, settings.port, login)
        return
    if settings.mode == "mosquitto":
        with _local_mosquitto(settings, progress, workdir) as endpoint:
            yield endpoint
        return
    # Loopback only (BrokerSettings refuses another host): it has no logins.
    handle: BrokerHandle = start_embedded_broker(port=settings.port, host=settings.host)
    progress(f"embedded MQTT broker listening on {handle.host}:{handle.port}")
    try:
        yield BrokerEndpoint(handle.host, handle.port, TransportConfig(handle.host, handle.port, client_id))
    finally:
        handle.close()


@contextlib.contextmanager
def _local_mosquitto(settings: BrokerSettings, progress: Progress, workdir: Path | None) -> Iterator[BrokerEndpoint]:
    """A mosquitto on the credentials folder's password file and ACL (+ a TLS listener)."""
    store = CredentialStore(settings.credentials_dir or None)
    login = store.coordinator_credentials()  # also (re)writes passwd and acl from the registry
    tls: list[str] = []
    if settings.server_cert_file:
        tls = [
            f"certfile {Path(settings.server_cert_file).resolve()}",
            f"keyfile {Path(settings.server_key_file).resolve()}",
        ]
        if settings.ca_file:
            tls.append(f"cafile {Path(settings.ca_file).resolve()}")
        if settings.require_client_cert:
            tls.append("require_certificate true")
    # What the broker reads at start; an `add`/`revoke` that lands before record_broker below
    # cannot signal it, so a change seen after recording makes us signal it ourselves.
    files_at_start = (store.passwd_file.read_bytes(), store.acl_file.read_bytes())
    handle = start_mosquitto(
        port=settings.port,
        host=settings.host,
        password_file=store.passwd_file,
        acl_file=store.acl_file,
        username_as_client_id=True,
        # The coordinator comes in on loopback, so the TLS certificate need only name the
        # host the clients dial.
        local_listener=True,
        extra_config=tls,
        workdir=workdir,
    )
    assert handle.local_port is not None
    store.record_broker(handle)
    if (store.passwd_file.read_bytes(), store.acl_file.read_bytes()) != files_at_start:
        store.reload_broker()
    active = sum(c.active for c in store.clients())
    progress(
        f"mosquitto listening on {handle.host}:{handle.port} ({'TLS' if tls else 'plaintext'}"
        f"{', client certificates required' if settings.require_client_cert else ''}); "
        f"logins and ACL from {store.directory} ({active} client(s))"
    )
    try:
        yield BrokerEndpoint(
            handle.host,
            handle.port,
            TransportConfig(
                # use_username_as_clientid: the broker names the session after the user anyway.
                "127.0.0.1", handle.local_port, login.username,
                username=login.username, password=login.password,
            ),
        )
    finally:
        store.forget_broker(handle)
        handle.close()
