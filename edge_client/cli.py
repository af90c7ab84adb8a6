"""`fedsoda-client`: the edge client's command line.

Only this module talks to the terminal: library code logs and raises
:class:`shared.errors.FedSodaError`, which is turned into an exit code here.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="fedsoda edge client: probe hardware, join a run, train QLoRA adapters.")


@app.callback()
def main() -> None:
    """fedsoda edge client (a callback keeps Typer from collapsing a one-command app)."""


@app.command()
def probe(
    model: Annotated[Optional[Path], typer.Option(help="A Hugging Face model folder (its config.json): also plan its training here.")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Override the detected device class by catalog name (see `fedsoda-coordinator profiles`).")] = None,
    ranking: Annotated[Optional[Path], typer.Option(help="SGP ranking JSON (a list of layer lists, or a `prune --json` report); default: deepest layers first.")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step.")] = 4,
    min_batch_size: Annotated[Optional[int], typer.Option(help="Let the plan fall back to batches this small (default: no fallback).")] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 64,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank.")] = 8,
    targets: Annotated[str, typer.Option(help="LoRA target modules, comma-separated.")] = "q_proj,v_proj",
    precision: Annotated[Optional[str], typer.Option(help="Force a weight precision: nf4, int8, bf16, fp16 or fp32 (default: the device's best).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")] = False,
) -> None:
    """Show the detected hardware, its catalog class and, with --model, the largest sub-LLM it can train."""
    import json

    from hardware_profiles.report import planner_options, probe_tables, run_probe
    from shared.console import console, run_command
    from shared.errors import InsufficientMemoryError

    result = run_command(
        lambda: run_probe(
            model=model,
            override=profile,
            ranking_file=ranking,
            options=planner_options(batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank, targets=targets,
                                    precision=precision, min_batch_size=min_batch_size),
        )
    )
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
    else:
        for table in probe_tables(result):
            console.print(table)
    if result.plan_error:
        raise typer.Exit(InsufficientMemoryError.exit_code)


def _default_client_id() -> str:
    # Topic segments allow only [A-Za-z0-9._-]: keep the host name readable but safe.
    host = "".join(c if c.isalnum() or c in "._-" else "-" for c in socket.gethostname())[:48]
    return f"{host or 'client'}"


@app.command()
def join(
    data: Annotated[Path, typer.Option(help="Local training data: .jsonl or .csv (see README for the formats).")],
    broker: Annotated[Optional[str], typer.Option(help="Broker HOST:PORT (default: the credentials file's, else 127.0.0.1:1883).", envvar="FEDSODA_BROKER")] = None,
    run_id: Annotated[str, typer.Option("--run", help="Run id to join.", envvar="FEDSODA_RUN")] = "demo",
    client_id: Annotated[Optional[str], typer.Option(help="This client's stable id (default: the host name).", envvar="FEDSODA_CLIENT_ID")] = None,
    profile: Annotated[Optional[str], typer.Option(help="Override the detected device class by catalog name (see `fedsoda-coordinator profiles`).")] = None,
    memory_limit: Annotated[Optional[str], typer.Option(help="This process may use SIZE in all (e.g. 1.5GiB, 800MiB, or bytes): it reports at most that to the coordinator and runs under a real cap of it (RLIMIT_DATA), training on the CPU; with --profile it plays that class on this machine.", metavar="SIZE")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(help="Chunk cache and resume state (default ~/.cache/fedsoda/clients/CLIENT_ID).")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda or auto.")] = "auto",
    username: Annotated[Optional[str], typer.Option(help="MQTT user name.", envvar="FEDSODA_USERNAME")] = None,
    password: Annotated[Optional[str], typer.Option(help="MQTT password.", envvar="FEDSODA_PASSWORD")] = None,
    ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate: enables TLS.")] = None,
    cert_file: Annotated[Optional[Path], typer.Option(help="Client certificate for mutual TLS.")] = None,
    key_file: Annotated[Optional[Path], typer.Option(help="Client key for mutual TLS.")] = None,
    credentials: Annotated[Optional[Path], typer.Option(help="Credentials file from `fedsoda-coordinator credentials add` (client id, login, broker, CA, coordinator key): keeps the password off the command line.", envvar="FEDSODA_CREDENTIALS")] = None,
    coordinator_key: Annotated[Optional[str], typer.Option(help="The coordinator's public key, 'ed25519:...' or its coordinator.pub file (serve prints both): every message on a coordinator topic must be signed by it. Default: the credentials file's coordinator_key.", envvar="FEDSODA_COORDINATOR_KEY", metavar="KEY_OR_FILE")] = None,
    idle_timeout: Annotated[Optional[float], typer.Option(help="Give up after this many seconds with nothing to do.")] = None,
    keepalive: Annotated[int, typer.Option(min=1, help="Seconds between MQTT pings; after 1.5x this without a word the broker declares this client gone (its Last Will).", envvar="FEDSODA_KEEPALIVE")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Join a run: say hello, fetch the assigned sub-LLM, train each scheduled round, send deltas."""
    from shared.console import run_command, setup_logging

    setup_logging(verbose)

    def body():
        # Imported first: torch and the client's code are part of what a memory cap holds.
        from edge_client.runner import ClientOptions
        from shared.config import cache_dir
        from shared.console import parse_broker_address
        from shared.transport_types import TransportConfig

        limit = _memory_cap(memory_limit, device)
        address, cid, user, secret, ca, pinned, own = _login(credentials, broker, client_id, username, password, ca_file, state_dir)
        key = _coordinator_key(coordinator_key, pinned)  # before any connection: nothing unverified is ever read
        host, port = parse_broker_address(address)
        folder = state_dir or cache_dir() / "clients" / cid
        options = ClientOptions(
            run_id=run_id, client_id=cid, state_dir=folder, coordinator_key=key, signing_key=_client_key(own, folder),
            device=device, idle_timeout=idle_timeout, memory_limit_bytes=limit,
        )
        transport = TransportConfig(
            host=host, port=port, client_id=cid, username=user, password=secret,
            ca_file=ca, cert_file=cert_file, key_file=key_file, keepalive=keepalive,
        )
        return _join(data, profile, options, transport)

    outcome = run_command(body)
    if as_json:
        import dataclasses
        import json

        typer.echo(json.dumps(dataclasses.asdict(outcome)))
    if outcome.status != "finished":
        raise typer.Exit(1)


def _memory_cap(memory_limit: str | None, device: str) -> int | None:
    """Apply ``--memory-limit`` to this process now; return the cap applied (None without one)."""
    if memory_limit is None:
        return None
    from edge_client.memory_cap import apply_memory_cap, data_in_use_bytes
    from hardware_profiles.memory import describe_bytes, parse_bytes
    from shared.console import console
    from shared.errors import ConfigError

    requested = parse_bytes(memory_limit, "--memory-limit")
    if device == "cuda":
        # RLIMIT_DATA does not count GPU memory: a CUDA run would not be held to the size.
        raise ConfigError("--memory-limit caps host memory, which a CUDA run is not held to: use --device cpu or auto")
    applied = apply_memory_cap(requested)
    tighter = f" (the limit already in force; {describe_bytes(requested)} asked)" if applied < requested else ""
    console.print(f"[cyan]>[/] memory cap {describe_bytes(applied)}{tighter} on the whole process (RLIMIT_DATA), "
                  f"{describe_bytes(data_in_use_bytes())} in use now; training on the CPU")
    return applied


def _coordinator_key(flag: str | None, from_credentials: str):
    """The key this client pins: ``--coordinator-key``, else the credentials file's.

    The flag wins so a rotated key can be handed out as a new ``coordinator.pub`` without
    re-issuing credentials.

    Raises:
        ConfigError: Neither is given (the message names both ways to pin it), or the key is malformed.
    """
    from shared.errors import ConfigError
    from shared.signing import parse_verify_key

    if flag:
        return parse_verify_key(flag)
    if from_credentials:
        return parse_verify_key(from_credentials)
    raise ConfigError(
        "no coordinator key is pinned, so this client could not tell the coordinator's messages from a stranger's: "
        "pass --coordinator-key with the key (or the coordinator.pub file) `fedsoda-coordinator serve` prints, "
        "or join with --credentials FILE from `fedsoda-coordinator credentials add`, which carries it as coordinator_key"
    )


def _client_key(from_credentials: str, state_dir: Path):
    """This client's signing key: the credentials file's, else ``client-signing.key`` in its state folder (made on first join)."""
    from shared.signing import SigningKey, load_or_create_signing_key

    if from_credentials:
        return SigningKey.from_private_text(from_credentials)
    return load_or_create_signing_key(state_dir / "client-signing.key", write_public=False)


def _login(credentials, broker, client_id, username, password, ca_file, state_dir):
    """(broker, client id, user, password, CA file, coordinator key, client key) from the flags and the --credentials file."""
    from shared.config import cache_dir
    from shared.credentials import load_client_credentials
    from shared.errors import ConfigError

    if credentials is None:
        return broker or "127.0.0.1:1883", client_id or _default_client_id(), username, password, ca_file, "", ""
    creds = load_client_credentials(credentials)
    if username is not None or password is not None:
        raise ConfigError("--credentials holds the login already: drop --username/--password (or FEDSODA_USERNAME/FEDSODA_PASSWORD)")
    if client_id is not None and client_id != creds.client_id:
        raise ConfigError(f"--client-id {client_id!r} is not the credentials file's client {creds.client_id!r}: "
                          "the broker lets this login act only as that client")
    ca = ca_file or creds.ca_file(state_dir or cache_dir() / "clients" / creds.client_id)
    return (broker or creds.broker or "127.0.0.1:1883", creds.client_id, creds.username, creds.password, ca,
            creds.coordinator_key, creds.client_key)


def _join(data, profile_name, options, transport_config):
    """Read the data, probe the device and run the client with progress bars; return its outcome.

    Under ``--memory-limit`` the device is :func:`~hardware_profiles.detect.emulated_profile`
    (measured at start and again for the preflight), otherwise the detected one.

    The rows are only read here; the task the coordinator publishes formats them (a row that
    does not fit it stops the client with its file and line).
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from edge_client.data import load_rows
    from edge_client.runner import ClientEvents, EdgeClient
    from hardware_profiles.detect import detect_profile, emulated_profile
    from shared.console import console

    rows = load_rows(data)
    limit = options.memory_limit_bytes
    if limit is None:
        measure = lambda: detect_profile(override=profile_name)  # noqa: E731
    else:  # the class's capabilities (or this machine's), on this CPU, memory capped at the limit
        measure = lambda: emulated_profile(limit, device_class=profile_name)  # noqa: E731
    profile = measure()
    console.print(f"[cyan]>[/] {profile.name}: {profile.device_class}, {profile.accelerator}, "
                  f"{profile.available_memory_bytes / 2**30:.1f} GiB free; {len(rows)} local rows in {data}")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(), console=console, transient=True) as bars:
        fetch_bar = train_bar = None

        def on_fetch(p):
            nonlocal fetch_bar
            if fetch_bar is None:
                fetch_bar = bars.add_task("sub-LLM", total=p.total_bytes)
            bars.update(fetch_bar, completed=p.done_bytes)

        def on_train(p):
            nonlocal train_bar
            if train_bar is None or p.step == 1:
                train_bar = bars.add_task("training", total=p.total_steps)
            bars.update(train_bar, completed=p.step, description=f"training (loss {p.loss:.3f})")

        events = ClientEvents(on_status=lambda m: console.print(f"[cyan]>[/] {m}"), on_fetch=on_fetch, on_train=on_train)
        client = EdgeClient(options, transport_config, profile, rows, events,
                            measure_profile=measure)
        outcome = client.run()
    console.print(f"[bold]{outcome.status}[/]: {outcome.reason}; rounds sent {outcome.rounds_sent}, "
                  f"{outcome.bytes_received / 2**20:.1f} MiB down, {outcome.bytes_sent / 2**20:.1f} MiB up")
    return outcome
