"""A local mosquitto started with a generated config.

:func:`start_mosquitto` writes a config (listener, size limit, persistence, and optionally
logins, an ACL and a plaintext loopback listener) into a work folder and runs
``/usr/sbin/mosquitto`` (or the one on PATH) with it. Unlike the embedded broker,
mosquitto keeps retained messages and sessions across a restart.
"""

from __future__ import annotations

import getpass
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from shared.broker import DEFAULT_MAX_PAYLOAD, BrokerHandle, broker_workdir, free_port, start_with_port_retry
from shared.credentials import mosquitto_password_hash, write_private
from shared.errors import BrokerError
from shared.protocol import MAX_MESSAGE_BYTES


def find_mosquitto() -> str:
    """Path of the mosquitto binary.

    Returns:
        ``/usr/sbin/mosquitto`` or the one on PATH.

    Raises:
        BrokerError: Not installed.
    """
    for candidate in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto is not installed (apt-get install mosquitto); or use the embedded broker")


def start_mosquitto(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    max_packet_bytes: int = DEFAULT_MAX_PAYLOAD,
    persistence: bool = True,
    users: dict[str, str] | None = None,
    password_file: str | os.PathLike[str] | None = None,
    acl_file: str | os.PathLike[str] | None = None,
    username_as_client_id: bool = False,
    local_listener: bool = False,
    extra_config: str | Sequence[str] = (),
    workdir: str | os.PathLike[str] | None = None,
    timeout: float = 15.0,
) -> BrokerHandle:
    """Start a local mosquitto with a generated config.

    Args:
        port: Port; 0 picks a free one.
        host: Listen host.
        max_packet_bytes: Largest accepted packet (``max_packet_size``, capped at 256 MiB - 1).
        persistence: Keep retained messages and sessions across :meth:`BrokerHandle.restart`.
        users: user -> password, written to a password file in the work folder; anonymous
            clients are refused.
        password_file: An existing mosquitto password file to use instead of ``users``
            (mosquitto re-reads it on SIGHUP); anonymous clients are refused.
        acl_file: A mosquitto ACL file (what each user may publish and read).
        username_as_client_id: The broker replaces each client's MQTT client id with its user
            name, so an authenticated user can never take over another user's session.
        local_listener: Also listen, in plaintext, on a free port of 127.0.0.1
            (:attr:`BrokerHandle.local_port`): a way in for a process on this machine when the
            main listener speaks TLS with a certificate for the public host name. Logins and
            the ACL apply there too.
        extra_config: Lines appended after the main listener (so listener options like
            ``cafile``/``certfile``/``keyfile``/``require_certificate`` apply to it).
        workdir: Folder for config, log and data; a temp folder (deleted on close) by default.
        timeout: Seconds to wait for the listener.

    Returns:
        A running :class:`BrokerHandle`.

    Raises:
        BrokerError: mosquitto is missing, rejected the config, or did not come up.
    """
    if users and password_file is not None:
        raise BrokerError("give start_mosquitto either users or password_file, not both")
    binary = find_mosquitto()
    root, owned = broker_workdir(workdir, "fedsoda-mosquitto-")
    extra = [extra_config] if isinstance(extra_config, str) else list(extra_config)
    if users:
        lines = "".join(f"{user}:{mosquitto_password_hash(password)}\n" for user, password in users.items())
        password_file = write_private(root / "passwd", lines)
    auth = ["allow_anonymous true"]
    if password_file is not None:
        auth = ["allow_anonymous false", f"password_file {Path(password_file).resolve()}"]
    if acl_file is not None:
        auth.append(f"acl_file {Path(acl_file).resolve()}")
    # A listener option: it must follow each listener line.
    per_listener = ["use_username_as_clientid true"] if username_as_client_id else []

    def make(p: int) -> BrokerHandle:
        local_port = free_port("127.0.0.1") if local_listener else None
        lines = [
            # As root mosquitto would switch to the 'mosquitto' user, who cannot read our temp files.
            f"user {getpass.getuser()}",
            "per_listener_settings false",
            *auth,
            f"max_packet_size {min(max_packet_bytes, MAX_MESSAGE_BYTES)}",
            "max_inflight_messages 20",
            "max_queued_messages 10000",
            "max_queued_bytes 0",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {root}/",
            "autosave_interval 0",
            f"log_dest file {root / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "connection_messages false",
            f"listener {p} {host}",
            *per_listener,
            *extra,
        ]
        if local_port is not None:
            lines += [f"listener {local_port} 127.0.0.1", *per_listener]
        conf = root / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        handle = BrokerHandle(
            "mosquitto", host, p, root, 5, [binary, "-c", str(conf)], None, None, owned, root / "mosquitto.log"
        )
        handle.local_port, handle.config_file = local_port, conf
        return handle

    return start_with_port_retry(make, port, host, timeout)
