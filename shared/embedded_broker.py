"""The embedded broker: the default for one-machine runs and tests.

It is ``iotcore`` (the Rust broker rumqttd in a pip wheel). It was chosen over
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

The embedded broker always runs as a child process (``python -m shared.embedded_broker``),
so a test can kill it, and it exits by itself when its parent dies.

It takes anyone: no logins, no ACL (rumqttd's static ``auth`` table wants plaintext
passwords, and the credentials folder keeps only their hashes; it has no per-client topic
rules at all). So it listens on loopback only (:func:`check_loopback_host`): a federation
across machines uses ``broker = "mosquitto"`` with a credentials folder.

Run a broker for a multi-process demo with ``python -m shared.embedded_broker --port 1883``.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

from shared.broker import (
    DEFAULT_MAX_PAYLOAD,
    BrokerHandle,
    broker_workdir,
    start_with_port_retry,
)
from shared.errors import BrokerError

_REPO_ROOT = Path(__file__).resolve().parent.parent

LOOPBACK_ONLY = (
    "the embedded broker takes anyone (no logins, no ACL), so it listens on loopback only "
    "(127.0.0.0/8, ::1, localhost); for a federation across machines use broker mode \"mosquitto\" "
    "(serve --broker-mode mosquitto, [broker] mode = \"mosquitto\") with a credentials folder "
    "(fedsoda-coordinator credentials add ...)"
)
"""Why a non-loopback host is refused, and what to use instead."""


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface only.

    Args:
        host: A host name or IP address (IPv6 with or without brackets).

    Returns:
        True for ``localhost``, 127.0.0.0/8 and ::1; False for anything else, ``0.0.0.0`` included.
    """
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another host name: it may resolve to any interface


def check_loopback_host(host: str) -> None:
    """Refuse to let the embedded broker listen beyond loopback.

    Args:
        host: The listen host asked for.

    Raises:
        BrokerError: ``host`` is not a loopback address (the message says what to use instead).
    """
    if not is_loopback_host(host):
        raise BrokerError(f"refusing to listen on {host!r}: {LOOPBACK_ONLY}")


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
    # rumqttd parses a socket address: no host names, IPv6 in brackets.
    host = "127.0.0.1" if host.lower() == "localhost" else host.strip("[]")
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
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
listen = "{listen}"
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
        BrokerError: ``host`` is not a loopback address (:func:`check_loopback_host`), or
            iotcore is missing, or the broker did not come up.
    """
    check_loopback_host(host)
    if mqtt_version not in (4, 5):
        raise BrokerError(f"mqtt_version must be 4 (3.1.1) or 5, got {mqtt_version}")
    root, owned = broker_workdir(workdir, "fedsoda-broker-")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)

    def make(p: int) -> BrokerHandle:
        argv = [
            sys.executable,
            "-m",
            "shared.embedded_broker",
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

    return start_with_port_retry(make, port, host, timeout)


def _exit_when_parent_goes() -> None:
    try:
        sys.stdin.buffer.read()  # returns when the parent's end of the pipe closes
    finally:
        os._exit(0)


def main(argv: list[str] | None = None) -> None:
    """Run the embedded broker in this process until interrupted (``python -m shared.embedded_broker``).

    Args:
        argv: Command-line arguments (default ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        prog="python -m shared.embedded_broker", description="fedsoda's embedded MQTT broker (rumqttd via iotcore)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="listen address, loopback only (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="listen port (default 1883)")
    parser.add_argument("--max-payload", type=int, default=DEFAULT_MAX_PAYLOAD, help="largest publish in bytes")
    parser.add_argument("--mqtt-version", type=int, choices=(4, 5), default=5, help="5, or 4 for 3.1.1 only")
    parser.add_argument(
        "--exit-with-parent", action="store_true", help="exit when stdin closes (used by start_embedded_broker)"
    )
    args = parser.parse_args(argv)
    if not is_loopback_host(args.host):
        parser.error(f"--host {args.host}: {LOOPBACK_ONLY}")
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
