"""Brokers for one-machine runs and tests: the embedded default and a local mosquitto.

Embedded broker: ``iotcore`` (the Rust broker rumqttd in a pip wheel). It was chosen over
``amqtt`` on measurements made on this project's 2-core box with paho clients (QoS 1,
loopback, 40 x 4 MiB messages and 3 x 50 MiB): iotcore 159-212 MiB/s and 56-105 MiB/s,
mosquitto 2.0.11 74-146 and 35-49, amqtt 24 and 21. iotcore also passed the features
fedsoda relies on (MQTT v5, retained messages, Last Will, persistent sessions that queue
QoS 1 messages for an absent client), while amqtt 0.12 lost the persistent session
(session_present false, the queued message never arrived) and speaks only 3.1.1.
What iotcore lacks: retained messages and sessions live in memory only, so they do not
survive a broker restart (mosquitto's persistence does), and an over-size publish makes it
drop the connection instead of answering with a reason code (the transport checks sizes
before sending, so this never happens to fedsoda's own clients).

The embedded broker always runs as a child process (``python -m shared.broker``), so a
test can kill it, and it exits by itself when its parent dies. ``start_mosquitto`` writes
a config (loopback listener, size limit, persistence) into a work folder and runs
``/usr/sbin/mosquitto`` (or the one on PATH) with it.

Run a broker for a multi-process demo with ``python -m shared.broker --port 1883``.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.credentials import mosquitto_password_hash, write_private
from shared.errors import BrokerError
from shared.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = MAX_MESSAGE_BYTES
"""Both brokers accept any message the protocol allows (256 MiB - 1) unless told otherwise."""

_REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it).

    Args:
        host: Interface to probe.

    Returns:
        The port number.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``.

    Args:
        host: Host.
        port: Port.
        timeout: Connect timeout in seconds.

    Returns:
        True if a connection succeeded.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class BrokerHandle:
    """A broker process we started: where it listens and how to stop or restart it.

    Attributes:
        kind: ``"embedded"`` or ``"mosquitto"``.
        host: Listening host.
        port: Listening port (kept across :meth:`restart`).
        workdir: Folder with its config, log and persistence data.
        mqtt_version: Highest MQTT version it speaks (5 or 4 for 3.1.1).
        local_port: mosquitto's extra plaintext listener on 127.0.0.1, if it has one (the
            coordinator's own way in when the main listener speaks TLS).
        config_file: mosquitto's config file (None for the embedded broker).
    """

    kind: Literal["embedded", "mosquitto"]
    host: str
    port: int
    workdir: Path
    mqtt_version: int = 5
    _argv: list[str] = field(default_factory=list, repr=False)
    _env: dict[str, str] | None = field(default=None, repr=False)
    _process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_workdir: bool = field(default=False, repr=False)
    _log_file: Path | None = field(default=None, repr=False)
    local_port: int | None = None
    config_file: Path | None = None

    @property
    def pid(self) -> int | None:
        """Process id while running."""
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        """Whether the broker process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def url(self) -> str:
        """``mqtt://host:port``."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> BrokerHandle:
        """Start the process (on :attr:`port`) and wait until it accepts connections.

        Args:
            timeout: Seconds to wait for the listener.

        Returns:
            self.

        Raises:
            BrokerError: It exited or did not listen in time (the log tail is included).
        """
        if self.is_running:
            return self
        deadline = time.monotonic() + timeout
        # After a restart the old socket may linger a moment; wait until the port is free.
        while port_open(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        with contextlib.ExitStack() as stack:
            log_fh = (
                stack.enter_context(self._log_file.open("ab")) if self._log_file is not None else subprocess.DEVNULL
            )
            self._process = subprocess.Popen(
                self._argv,
                stdin=subprocess.PIPE,  # the embedded broker exits when this pipe closes
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env=self._env,
            )
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                self._process = None
                raise BrokerError(f"{self.kind} broker exited with code {code} on start: {self.log_tail()}")
            if port_open(self.host, self.port):
                log.info("%s broker listening on %s:%s (pid %s)", self.kind, self.host, self.port, self.pid)
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(
            f"{self.kind} broker did not listen on {self.host}:{self.port} within {timeout:.0f} s: {self.log_tail()}"
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop gracefully (SIGTERM: mosquitto saves its persistence file). Safe to call twice.

        Args:
            timeout: Seconds before SIGKILL.
        """
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if process.stdin is not None:
            process.stdin.close()

    def kill(self) -> None:
        """SIGKILL the broker, as a crash would (nothing is saved)."""
        process = self._process
        if process is None:
            return
        self._process = None
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        if process.stdin is not None:
            process.stdin.close()

    def restart(self, timeout: float = 15.0) -> BrokerHandle:
        """Stop and start again on the same port (mosquitto keeps retained messages).

        Args:
            timeout: Seconds to wait for the new listener.

        Returns:
            self.
        """
        self.stop()
        return self.start(timeout)

    def close(self) -> None:
        """Stop and delete the work folder if this handle created it."""
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the broker's log (for error messages)."""
        if self._log_file is None or not self._log_file.is_file():
            return "(no log)"
        text = self._log_file.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) or "(empty log)"

    def __enter__(self) -> BrokerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _workdir(workdir: str | os.PathLike[str] | None, prefix: str) -> tuple[Path, bool]:
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def _start_with_port_retry(make: Callable[[int], BrokerHandle], port: int, host: str, timeout: float) -> BrokerHandle:
    """Start a handle; with an OS-picked port, retry on the rare race where another process took it."""
    attempts = 3 if port == 0 else 1
    for attempt in range(attempts):
        handle: BrokerHandle = make(port or free_port(host))
        try:
            return handle.start(timeout)
        except BrokerError as exc:
            handle.stop()
            if attempt == attempts - 1 or "in use" not in str(exc).lower():
                handle.close()
                raise
    raise AssertionError("unreachable")


def rumqttd_config(host: str, port: int, *, max_payload_bytes: int, mqtt_version: int) -> str:
    """The rumqttd TOML that :func:`start_embedded_broker` runs.

    Args:
        host: Listen host.
        port: Listen port.
        max_payload_bytes: Largest accepted publish.
        mqtt_version: 5 or 4 (3.1.1).

    Returns:
        TOML text.
    """
    section = "v5" if mqtt_version == 5 else "v4"
    # rumqttd keeps each topic's recent messages in a ring of segments: bound it (16 MiB x 4)
    # so a 300 MB blob moving through one chunk topic does not pile up in the broker.
    return f"""id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = {16 * 1024 * 1024}
max_segment_count = 4

[{section}.1]
name = "{section}-1"
listen = "{host}:{port}"
next_connection_delay_ms = 1

[{section}.1.connections]
connection_timeout_ms = 60000
max_payload_size = {max_payload_bytes}
max_inflight_count = 100
dynamic_filters = true
"""


def start_embedded_broker(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD,
    mqtt_version: int = 5,
    workdir: str | os.PathLike[str] | None = None,
    timeout: float = 15.0,
) -> BrokerHandle:
    """Start the embedded broker (iotcore / rumqttd) as a child process.

    Args:
        port: Port; 0 picks a free one.
        host: Listen host.
        max_payload_bytes: Largest accepted publish.
        mqtt_version: 5 (default) or 4 for a 3.1.1-only listener.
        workdir: Folder for its config and log; a temp folder (deleted on close) by default.
        timeout: Seconds to wait for the listener.

    Returns:
        A running :class:`BrokerHandle`.

    Raises:
        BrokerError: iotcore is missing or the broker did not come up.
    """
    if mqtt_version not in (4, 5):
        raise BrokerError(f"mqtt_version must be 4 (3.1.1) or 5, got {mqtt_version}")
    root, owned = _workdir(workdir, "fedsoda-broker-")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)

    def make(p: int) -> BrokerHandle:
        argv = [
            sys.executable,
            "-m",
            "shared.broker",
            "--host",
            host,
            "--port",
            str(p),
            "--max-payload",
            str(max_payload_bytes),
            "--mqtt-version",
            str(mqtt_version),
            "--exit-with-parent",
        ]
        return BrokerHandle("embedded", host, p, root, mqtt_version, argv, env, None, owned, root / "broker.log")

    return _start_with_port_retry(make, port, host, timeout)


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
    root, owned = _workdir(workdir, "fedsoda-mosquitto-")
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

    return _start_with_port_retry(make, port, host, timeout)


def _exit_when_parent_goes() -> None:
    try:
        sys.stdin.buffer.read()  # returns when the parent's end of the pipe closes
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Run the embedded broker in this process until interrupted (``python -m shared.broker``).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m shared.broker", description="fedsoda's embedded MQTT broker (rumqttd via iotcore)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="listen port (default 1883)")
    parser.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD, help="largest publish in bytes")
    parser.add_argument("--mqtt-version", type=int, choices=(4, 5), default=5, help="5, or 4 for 3.1.1 only")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="exit when stdin closes (used by start_embedded_broker)"
    )
    args = parser.parse_args(argv)
    try:
        from iotcore.iotcore import IotCoreBroker
    except ImportError as exc:
        raise SystemExit(f"the embedded broker needs the 'iotcore' package: pip install iotcore ({exc})") from exc
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # rumqttd reports every routed packet through error-level tracing spans: keep its logger quiet.
    logging.getLogger("rumqttd").setLevel(logging.CRITICAL)
    if args.exit_with_parent:
        threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    # The config is parsed on construction, so the temp file is gone before the broker runs
    # (a SIGTERM would skip any cleanup after run_forever).
    with tempfile.TemporaryDirectory(prefix="fedsoda-rumqttd-") as tmp:
        config = Path(tmp) / "rumqttd.toml"
        config.write_text(
            rumqttd_config(args.host, args.port, max_payload_bytes=args.max_payload, mqtt_version=args.mqtt_version)
        )
        broker = IotCoreBroker(config_path=str(config))
    version = "5" if args.mqtt_version == 5 else "3.1.1"
    print(f"fedsoda embedded broker listening on {args.host}:{args.port} (MQTT {version})", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        broker.run_forever()


if __name__ == "__main__":
    main()
