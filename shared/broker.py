"""A broker process fedsoda started, and what both kinds of broker share.

:class:`BrokerHandle` says where a broker listens and starts, stops, kills and restarts its
process on the same port; :func:`free_port` and :func:`port_open` probe ports. The brokers
themselves live in :mod:`shared.embedded_broker` (the default for one-machine runs and
tests) and :mod:`shared.mosquitto` (a local, optionally authenticated mosquitto).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.errors import BrokerError
from shared.protocol import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = MAX_MESSAGE_BYTES
"""Both brokers accept any message the protocol allows (256 MiB - 1) unless told otherwise."""



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


def broker_workdir(workdir: str | os.PathLike[str] | None, prefix: str) -> tuple[Path, bool]:
    """The folder a broker keeps its config, log and data in.

    Args:
        workdir: A folder to use (created if missing); None makes a temp folder.
        prefix: Name prefix of the temp folder.

    Returns:
        The folder, and whether the handle owns it (deletes it on close).
    """
    if workdir is not None:
        path = Path(workdir)
        path.mkdir(parents=True, exist_ok=True)
        return path, False
    return Path(tempfile.mkdtemp(prefix=prefix)), True


def start_with_port_retry(make: Callable[[int], BrokerHandle], port: int, host: str, timeout: float) -> BrokerHandle:
    """Start a handle; with an OS-picked port, retry on the rare race where another process took it.

    Args:
        make: Builds the (not yet started) handle for a port.
        port: The port; 0 picks a free one.
        host: Listen host (where a free port is picked).
        timeout: Seconds to wait for the listener.

    Returns:
        The running handle.

    Raises:
        BrokerError: It exited or did not listen in time (a picked port another process took
            first is tried up to three times).
    """
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
