"""`fedsoda-coordinator`: the coordinator's command line.

Only this module talks to the terminal: library code logs and raises
:class:`shared.errors.FedSodaError`, which :func:`run_cli_command` turns into an exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

app = typer.Typer(no_args_is_help=True, help="fedsoda coordinator: prune, align, package and serve federated rounds.")

_DEVICE_HELP = "Where the full model, SGP, ODA and evaluation run: auto (CUDA when a GPU is visible), cuda or cpu."
_DTYPE_HELP = "Full model weights: auto (bf16 on a GPU that has it, else fp16; fp32 on the CPU), bf16, fp16 or fp32."


@app.callback()
def main() -> None:
    """fedsoda coordinator (a callback keeps Typer from collapsing a one-command app)."""


@app.command()
def profiles(
    catalog_dir: Annotated[Optional[list[Path]], typer.Option("--catalog", help="Extra catalog folder of device-class TOML files (repeatable).")] = None,
    model: Annotated[Optional[Path], typer.Option(help="A Hugging Face model folder: also show each class's plan for it.")] = None,
    ranking: Annotated[Optional[Path], typer.Option(help="SGP ranking JSON for the plans (default: deepest layers first).")] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per step for the plans.")] = 4,
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence for the plans.")] = 64,
    lora_rank: Annotated[int, typer.Option(help="LoRA rank for the plans.")] = 8,
    targets: Annotated[str, typer.Option(help="LoRA target modules, comma-separated.")] = "q_proj,v_proj",
    as_json: Annotated[bool, typer.Option("--json", help="Print the catalog as JSON on stdout.")] = False,
) -> None:
    """List the device catalog (memory, 4-bit support, throughput, budget) and, with --model, each class's tier."""
    import json

    from hardware_profiles.profile import CATALOG_DIR, load_catalog
    from hardware_profiles.report import catalog_report, catalog_table, planner_options
    from shared.console import console, run_command

    def body():
        catalog = load_catalog([CATALOG_DIR, *(catalog_dir or [])])
        options = planner_options(batch_size=batch_size, seq_len=seq_len, lora_rank=lora_rank, targets=targets,
                                  precision=None, min_batch_size=1)
        return catalog_report(catalog, model=model, ranking_file=ranking, options=options)

    report = run_command(body)
    if as_json:
        typer.echo(json.dumps(report))
    else:
        console.print(catalog_table(report))


def _load_run_config(config_file: Path | None, overrides: dict[str, Any]):
    from coordinator.settings import RunConfig
    from shared.config import load_config

    return load_config(RunConfig, config_file, overrides=overrides)


@app.command()
def serve(
    config_file: Annotated[Optional[Path], typer.Option("--config", help="Run configuration TOML (see README).", envvar="FEDSODA_CONFIG")] = None,
    model: Annotated[Optional[str], typer.Option(help="Full model: a Hugging Face folder or id, or 'bundled' (SmolLM2-135M).")] = None,
    public_data: Annotated[Optional[str], typer.Option(help="Public calibration text: 'wikipedia', 'owt' or a JSONL/text file.")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/RUN_ID).")] = None,
    run_id: Annotated[Optional[str], typer.Option(help="Run id (MQTT topic segment).")] = None,
    method: Annotated[Optional[str], typer.Option(help="fedsoda, fedot, fedpetuning or fedkrso.")] = None,
    tiers: Annotated[Optional[Path], typer.Option("--tiers", help="Use the tiers a `prune` run wrote in this folder (no SGP, no pre-alignment).")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task preset: rotten_tomatoes, imdb, medmcqa or gsm_symbolic (or define [task] in --config).")] = None,
    aggregation: Annotated[Optional[str], typer.Option(help="Aggregation strategy: fedavg, trimmed_mean or median (robust to a minority of hostile clients).")] = None,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP)] = None,
    dtype: Annotated[Optional[str], typer.Option(help=_DTYPE_HELP)] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds.")] = None,
    min_clients: Annotated[Optional[int], typer.Option(help="Clients needed before a round starts.")] = None,
    broker: Annotated[Optional[str], typer.Option(help="Broker HOST:PORT (default from the config).", envvar="FEDSODA_BROKER")] = None,
    broker_mode: Annotated[Optional[str], typer.Option(help="external (your broker at --broker), embedded (no logins, one-machine runs) or mosquitto (a local mosquitto with the logins and ACL of `credentials`).")] = None,
    credentials_dir: Annotated[Optional[Path], typer.Option(help="Credentials folder for --broker-mode mosquitto (default ~/.config/fedsoda/credentials).", envvar="FEDSODA_BROKER__CREDENTIALS_DIR")] = None,
    signing_key: Annotated[Optional[Path], typer.Option(help="The coordinator's Ed25519 signing key file, created if absent; clients pin the public key written beside it as coordinator.pub (default: coordinator-signing.key in the credentials folder when the broker uses one, else coordinator.key in the run directory).", envvar="FEDSODA_BROKER__SIGNING_KEY")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Carry on from the checkpoint in the run directory.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Prepare the sub-LLM tiers and run federated rounds until the run finishes."""
    from shared.console import parse_broker_address, run_command, setup_logging

    setup_logging(verbose)
    host = port = None
    if broker:
        host, port = run_command(lambda: parse_broker_address(broker))
    overrides = {
        "model.model": model,
        "model.public_data": public_data,
        "run_id": run_id,
        "method": method,
        "pruning.tiers_dir": str(tiers) if tiers else None,
        "task.preset": task,
        "aggregation.strategy": aggregation,
        "model.device": device,
        "model.dtype": dtype,
        "rounds.rounds": rounds,
        "rounds.min_clients": min_clients,
        "broker.host": host,
        "broker.port": port,
        "broker.mode": broker_mode,
        "broker.credentials_dir": str(credentials_dir) if credentials_dir else None,
        "broker.signing_key": str(signing_key) if signing_key else None,
    }
    outcome = run_command(lambda: _serve(_load_run_config(config_file, overrides), run_dir, resume=resume))
    _print_outcome(outcome, as_json)
    if outcome.status != "finished":
        raise typer.Exit(1)


def _serve(config, run_dir: Path | None, *, resume: bool):
    from coordinator.launch import serve_run
    from coordinator.run.credentials import signing_key_file
    from shared.signing import load_or_create_signing_key, public_key_file

    run_dir = run_dir or Path("runs") / config.run_id
    progress = _progress_printer()
    # The server loads this same file; loading it here first puts the key in the banner
    # before the (long) tier preparation, so clients can be started with it at once.
    key_file = signing_key_file(config.broker, run_dir)
    key = load_or_create_signing_key(key_file)
    progress(f"coordinator signing key {key_file}; clients pin {key.public.text} "
             f"(join --coordinator-key, or the file {public_key_file(key_file)})")
    return serve_run(config, run_dir, resume=resume, progress=progress)


def _progress_printer():
    from shared.console import console

    def show(message: str) -> None:
        console.print(f"[cyan]>[/] {message}", soft_wrap=True)  # one line each: paths stay whole in logs

    return show


def _print_outcome(outcome, as_json: bool) -> None:
    import json

    from rich.table import Table

    from shared.console import console

    if as_json:
        typer.echo(json.dumps({"status": outcome.status, "reason": outcome.reason, "run_dir": str(outcome.run_dir), "results": outcome.results}, default=str))
        return
    table = Table(title=f"run {outcome.status}", show_header=False)
    table.add_row("run directory", str(outcome.run_dir))
    if outcome.reason:
        table.add_row("reason", outcome.reason)
    for key, value in outcome.results.items():
        table.add_row(key, str(value))
    console.print(table)


@app.command()
def simulate(
    clients: Annotated[int, typer.Option(help="Client processes to start.")] = 3,
    config_file: Annotated[Optional[Path], typer.Option("--config", help="Run configuration TOML.", envvar="FEDSODA_CONFIG")] = None,
    method: Annotated[Optional[str], typer.Option(help="fedsoda, fedot, fedpetuning or fedkrso.")] = None,
    rounds: Annotated[Optional[int], typer.Option(help="Federated rounds.")] = None,
    partition: Annotated[str, typer.Option(help="iid or dirichlet (non-IID by label).")] = "iid",
    dirichlet_alpha: Annotated[float, typer.Option(help="Dirichlet concentration (smaller = more skewed).")] = 0.5,
    examples_per_client: Annotated[int, typer.Option(help="Training examples per client at most.")] = 200,
    profiles: Annotated[Optional[str], typer.Option(help="Comma-separated CLASS[:SIZE] entries, cycled over the clients: each plays catalog class CLASS on this machine's CPU, capped for real at SIZE (e.g. 1.5GiB; default: the class's memory less its reserved part), e.g. cpu-8gb:1.2GiB,jetson-orin-nano-8gb:1.5GiB. A class without 4-bit kernels (a Jetson) gets every tier published in bf16 too.", metavar="CLASS[:SIZE],...")] = None,
    model: Annotated[Optional[str], typer.Option(help="Full model: a Hugging Face folder or id, or 'bundled' (SmolLM2-135M).")] = None,
    task: Annotated[Optional[str], typer.Option(help="Task preset: rotten_tomatoes, imdb, medmcqa or gsm_symbolic (or define [task] in --config).")] = None,
    device: Annotated[Optional[str], typer.Option(help=_DEVICE_HELP)] = None,
    dtype: Annotated[Optional[str], typer.Option(help=_DTYPE_HELP)] = None,
    data: Annotated[Optional[Path], typer.Option(help="Training rows (JSONL/CSV) in the task's format, dealt to the clients (default: the preset's train split).")] = None,
    test_data: Annotated[Optional[Path], typer.Option(help="Test rows (JSONL/CSV) in the task's format (default: the preset's test split).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/RUN_ID-TIMESTAMP).")] = None,
    demo: Annotated[bool, typer.Option("--demo", help="The `make demo` preset: bundled SmolLM2, Rotten Tomatoes, 3 clients.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the outcome as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a whole federated fine-tuning on this machine: embedded broker, coordinator, N clients."""
    import time

    from coordinator.settings import preset
    from coordinator.simulate import SimulationOptions
    from shared.console import run_command, setup_logging

    setup_logging(verbose)
    overrides: dict[str, Any] = preset("demo") if demo else {}
    flags = {
        "method": method, "rounds.rounds": rounds, "model.model": model, "task.preset": task,
        "model.device": device, "model.dtype": dtype,
        "evaluation.test_data": str(test_data) if test_data else None,
    }
    overrides.update({k: v for k, v in flags.items() if v is not None})
    if not demo:
        overrides["rounds.min_clients"] = clients

    def body():
        config = _load_run_config(config_file, overrides)
        options = SimulationOptions(
            clients=clients, partition=partition, dirichlet_alpha=dirichlet_alpha,
            examples_per_client=examples_per_client,
            profiles=tuple(p.strip() for p in profiles.split(",")) if profiles else (),
            data=str(data) if data else "",
        )
        folder = run_dir or Path("runs") / f"{config.run_id}-{time.strftime('%Y%m%d-%H%M%S')}"
        from coordinator.simulate import simulate as run_simulation

        return run_simulation(config, options, folder, progress=_progress_printer())

    outcome, client_outcomes = run_command(body)
    if as_json:
        _print_outcome(outcome, as_json)
    else:
        from coordinator.run.reports import load_report, render_summary, write_plots
        from shared.console import console

        data = run_command(lambda: load_report(outcome.run_dir))
        render_summary(data)
        plots = write_plots(data, outcome.run_dir / "plots")
        console.print(f"run directory: {outcome.run_dir}  (plots: {', '.join(p.name for p in plots)} in {plots[0].parent})")
        if outcome.reason:
            console.print(f"[red]{outcome.status}[/]: {outcome.reason}")
    if outcome.status != "finished" or any(c.get("status") != "finished" for c in client_outcomes):
        raise typer.Exit(1)


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by serve or simulate.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    csv_file: Annotated[Optional[Path], typer.Option("--csv", help="Also write per-round, per-client rows as CSV here.")] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots into RUN_DIR/plots.")] = True,
) -> None:
    """Show a run's rounds and clients: participants, dropouts, rejections, bytes, time, memory, loss, accuracy."""
    import json

    from coordinator.run.reports import (
        load_report,
        render_summary,
        write_csv,
        write_plots,
    )
    from shared.console import console, run_command

    data = run_command(lambda: load_report(run_dir))
    if as_json:
        typer.echo(json.dumps(data, default=str))
    else:
        render_summary(data)
    if csv_file is not None:
        write_csv(data, csv_file)
        console.print(f"[cyan]>[/] wrote {csv_file}")
    if plots:
        for path in run_command(lambda: write_plots(data, run_dir / "plots")):
            console.print(f"[cyan]>[/] wrote {path}")


@app.command()
def status(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by serve or simulate (it may be running).")],
    watch: Annotated[bool, typer.Option("--watch", help="Redraw every --interval seconds until the run finishes or fails (Ctrl-C stops watching).")] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Seconds between redraws with --watch.")] = 2.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the status as JSON on stdout (with --watch: the final one).")] = False,
) -> None:
    """Show where a run stands: phase, round, model version; each client's tier, presence, round state, bytes, peak memory."""
    import json

    from coordinator.run.run_status import (
        read_status,
        status_dict,
        status_table,
        watch_status,
    )
    from shared.console import console, run_command

    if watch:
        current = run_command(lambda: watch_status(run_dir, interval=interval, console=console))
    else:
        current = run_command(lambda: read_status(run_dir))
    if as_json:
        typer.echo(json.dumps(status_dict(current)))
    else:
        console.print(status_table(current))


class _RichSink:
    """Progress sink for the prune study: one rich progress bar row per long step."""

    def __init__(self, progress) -> None:
        self._progress = progress

    def start(self, description: str, total: int):
        task = self._progress.add_task(description, total=total)
        return lambda n: self._progress.advance(task, n)


def _parse_depths(text: Optional[str]) -> tuple[int, ...]:
    from shared.errors import ConfigError

    try:
        return tuple(int(t) for t in text.split(",") if t.strip()) if text else ()
    except ValueError:
        raise ConfigError(f"--depths must be comma-separated integers, got {text!r}") from None


@app.command()
def prune(
    model: Annotated[str, typer.Option(help="Full model: a Hugging Face folder or id, or 'bundled' (SmolLM2-135M).")] = "bundled",
    public_data: Annotated[str, typer.Option(help="Public calibration text: 'wikipedia', 'owt' or a JSONL/text file.")] = "wikipedia",
    out: Annotated[Path, typer.Option(help="Output folder for the report and the tiers (serve --tiers reads it).")] = Path("runs/prune"),
    block_size: Annotated[int, typer.Option(help="Layers per SGP block.")] = 4,
    depths: Annotated[Optional[str], typer.Option(help="Layers each tier keeps, comma-separated (nested tiers; default: about 60%). The smallest is compared with uniform drop.")] = None,
    keep_head: Annotated[int, typer.Option(help="Protected layers at the start.")] = 1,
    keep_tail: Annotated[int, typer.Option(help="Protected layers at the end.")] = 1,
    token: Annotated[str, typer.Option(help="SGP tokens: 'all' non-padding tokens or the 'last' one.")] = "all",
    calib_samples: Annotated[int, typer.Option(help="Public paragraphs for SGP and ODA.")] = 64,
    eval_samples: Annotated[int, typer.Option(help="Held-out paragraphs for perplexity.")] = 32,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 128,
    oda: Annotated[bool, typer.Option("--oda/--no-oda", help="Distil the sub-LLMs (ODA) before packaging.")] = True,
    oda_steps: Annotated[int, typer.Option(help="ODA optimiser steps.")] = 24,
    oda_lr: Annotated[float, typer.Option(help="ODA learning rate.")] = 3e-4,
    oda_batch_size: Annotated[int, typer.Option(help="Sequences per ODA step.")] = 4,
    align_layers: Annotated[str, typer.Option(help="ODA trains the 'bridge' layers or 'all' layers.")] = "bridge",
    chunk_tokens: Annotated[int, typer.Option(help="Tokens whose logits exist at once in ODA's KL and in perplexity (memory only; lower it for a large vocabulary).")] = 256,
    precision: Annotated[str, typer.Option(help="Package precision: nf4, bf16 or fp32.")] = "nf4",
    device: Annotated[str, typer.Option(help=_DEVICE_HELP)] = "auto",
    dtype: Annotated[str, typer.Option(help=_DTYPE_HELP)] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """SGP-prune a model (+ ODA), compare with uniform drop, write the report and the tiers `serve --tiers` uses."""
    import contextlib
    import json

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )
    from rich.table import Table

    from shared.console import console, run_command, setup_logging

    setup_logging(verbose)

    def body():
        from coordinator.model.datasets import public_text
        from coordinator.model.models import load_model
        from coordinator.model.oda import ODAConfig
        from coordinator.model.progress import LineSink
        from coordinator.model.prune_study import PruneConfig, run_prune

        config = PruneConfig(
            block_size=block_size, depths=_parse_depths(depths), keep_head=keep_head, keep_tail=keep_tail,
            token=token, calib_samples=calib_samples, eval_samples=eval_samples, seq_len=seq_len,
            oda=ODAConfig(steps=oda_steps, learning_rate=oda_lr, align_layers=align_layers, kl_chunk_tokens=chunk_tokens) if oda else None,
            oda_batch_size=oda_batch_size, precision=precision,
        )
        from coordinator.model.models import resolve_model
        from coordinator.model.placement import resolve_placement
        from coordinator.model.preflight import preflight
        from hardware_profiles.shape import model_shape

        placement = resolve_placement(device, dtype)
        source = resolve_model(model)
        say = lambda line: console.print(f"[cyan]>[/] {line}", soft_wrap=True)  # noqa: E731
        preflight(source, config.workload(model_shape(source).num_layers, placement.device, placement.dtype), say)
        texts = public_text(public_data)
        say(f"loading {model} ({placement.describe()})")
        full, tokenizer = load_model(source, placement)
        with contextlib.ExitStack() as stack:
            if console.is_terminal:
                bars = stack.enter_context(Progress(
                    TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False,
                ))
                sink = _RichSink(bars)
            else:
                # A progress bar shows nothing until it ends when the output is a log file or a pipe.
                sink = LineSink(lambda line: console.print(f"[cyan]>[/] {line}", soft_wrap=True))
            return run_prune(full, tokenizer, texts, out, config, model_name=Path(str(model)).name, sink=sink)

    result = run_command(body)
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    ranking = Table(title=f"SGP ranking (blocks of {result.block_size}, most prunable first)")
    ranking.add_column("rank", justify="right")
    ranking.add_column("layers")
    ranking.add_column("distance", justify="right")
    for rank, block in enumerate(result.ranking, start=1):
        ranking.add_row(str(rank), f"{block['layers'][0]}-{block['layers'][-1]}", f"{block['distance']:.4f}")
    console.print(ranking)
    summary = Table(title=f"held-out perplexity, {result.num_layers} -> {result.depth} layers")
    summary.add_column("model")
    summary.add_column("perplexity", justify="right")
    for key, value in result.perplexity.items():
        summary.add_row(key, f"{value:.2f}")
    console.print(summary)
    for name, folder in result.packages.items():
        console.print(f"[cyan]>[/] tier {name} ({len(result.tiers[name])} layers): {folder}", soft_wrap=True)
    console.print(f"[cyan]>[/] report: {out / 'report.md'}, heat-map: {out / 'distances.png'}", soft_wrap=True)
    console.print(f"[cyan]>[/] train on these tiers: fedsoda-coordinator serve --tiers {out} ...", soft_wrap=True)


credentials_app = typer.Typer(
    no_args_is_help=True,
    help="Per-client broker logins: a mosquitto password file and an ACL that pins each client to its own topics.",
)
app.add_typer(credentials_app, name="credentials")

_CredentialsDir = Annotated[
    Optional[Path],
    typer.Option("--dir", help="Credentials folder (default ~/.config/fedsoda/credentials).", envvar="FEDSODA_BROKER__CREDENTIALS_DIR"),
]


@credentials_app.callback()
def credentials_main() -> None:
    """Per-client broker logins (add, revoke, list); `serve --broker-mode mosquitto` runs a broker on them."""


@credentials_app.command("add")
def credentials_add(
    client_id: Annotated[str, typer.Argument(help="The client's id (1-64 of letters, digits, '.', '_', '-').")],
    broker: Annotated[str, typer.Option(help="HOST:PORT the device dials (written into its credentials file).")],
    ca_file: Annotated[Optional[Path], typer.Option(help="CA certificate of the broker's TLS certificate: embedded in the credentials file.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="The device's credentials file (default ./CLIENT_ID.credentials.toml).")] = None,
    directory: _CredentialsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print client id, password and file as JSON on stdout.")] = False,
) -> None:
    """Issue a client a random password (shown once; only its hash is kept) and write its credentials file."""
    import json

    from coordinator.run.credentials import CredentialStore
    from shared.console import console, parse_broker_address, run_command
    from shared.credentials import write_client_credentials
    from shared.errors import ConfigError

    def body():
        host, port = parse_broker_address(broker)
        target = out or Path(f"{client_id}.credentials.toml")
        if target.exists():
            raise ConfigError(f"{target} exists; remove it or pass --out")
        try:
            ca_pem = ca_file.read_text() if ca_file is not None else ""
        except OSError as exc:
            raise ConfigError(f"cannot read --ca-file {ca_file}: {exc}") from None
        store = CredentialStore(directory)
        creds = store.add(client_id, broker=f"{host}:{port}", ca_pem=ca_pem)
        write_client_credentials(target, creds, comment=(
            f"fedsoda broker credentials of client {client_id!r}. Keep this file secret and hand it to the device:\n"
            f"  fedsoda-client join --credentials {target.name} --data DATA --run RUN\n"
            "coordinator_key pins the coordinator's signing key: the client refuses what it did not sign."
        ))
        return store, creds, target, store.reload_broker()

    store, creds, target, reload = run_command(body)
    if as_json:
        typer.echo(json.dumps({"client_id": creds.client_id, "username": creds.username, "password": creds.password, "file": str(target),
                               "coordinator_key": creds.coordinator_key}))
    else:
        console.print(f"[green]added[/] client [bold]{creds.client_id}[/] (user {creds.username}) in {store.directory}")
        console.print(f"password (shown once; only its hash is stored): [bold]{creds.password}[/]")
        console.print(f"credentials file for the device: {target}  (fedsoda-client join --credentials {target} ...)", soft_wrap=True)
        console.print(f"it pins the coordinator's signing key {creds.coordinator_key} ({store.signing_key_file})", soft_wrap=True)
    console.print(f"[cyan]>[/] {reload.describe()}", soft_wrap=True)


@credentials_app.command("revoke")
def credentials_revoke(
    client_id: Annotated[str, typer.Argument(help="The client whose login to revoke.")],
    directory: _CredentialsDir = None,
) -> None:
    """Revoke a client's login; a running local broker reloads and drops its connection."""
    from coordinator.run.credentials import CredentialStore
    from shared.console import console, run_command

    store = CredentialStore(directory)
    record, reload = run_command(lambda: (store.revoke(client_id), store.reload_broker()))
    console.print(f"[yellow]revoked[/] client [bold]{record.client_id}[/] ({record.revoked})")
    console.print(f"[cyan]>[/] {reload.describe()}", soft_wrap=True)


@credentials_app.command("list")
def credentials_list(
    directory: _CredentialsDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the clients as JSON on stdout.")] = False,
) -> None:
    """List the clients with logins: active and revoked."""
    import dataclasses
    import json

    from rich.table import Table

    from coordinator.run.credentials import CredentialStore
    from shared.console import console, run_command

    store = CredentialStore(directory)
    records = run_command(store.clients)
    if as_json:
        typer.echo(json.dumps([{**dataclasses.asdict(r), "active": r.active} for r in records]))
        return
    table = Table(title=f"broker credentials in {store.directory}")
    table.add_column("client")
    table.add_column("added")
    table.add_column("status")
    for r in records:
        table.add_row(r.client_id, r.added, "active" if r.active else f"[red]revoked {r.revoked}[/]")
    console.print(table)
