"""One-machine federated runs: embedded broker, coordinator, and N real client processes.

``simulate`` splits a dataset across clients: the task preset's fixed train split, or the
user's own file (``--data``); IID, or Dirichlet non-IID by label for classification and
multiple-choice tasks (seeded). It writes each client's share as a JSONL file, starts ``fedsoda-client join`` once
per client as a child process, and serves the run in this process through
:func:`coordinator.launch.serve_run` — the very code path of ``serve`` and ``join``.

``--profiles CLASS[:SIZE],...`` makes the clients play catalog classes on this machine: each
runs ``join --profile CLASS --memory-limit SIZE`` (SIZE defaults to the class's usable memory,
nominal less reserved), so it reports that class's capabilities and at most SIZE of memory, and
runs under a real cap of SIZE (:mod:`edge_client.memory_cap`): an estimate that is wrong for
the class ends that client with an out-of-memory error instead of passing on a bigger machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.launch import serve_run
from coordinator.model.datasets import task_split
from coordinator.model.pipeline import Progress
from coordinator.run.credentials import signing_key_file
from coordinator.run.server import RunOutcome
from coordinator.settings import RunConfig
from hardware_profiles.memory import describe_bytes, parse_bytes
from hardware_profiles.profile import Catalog, load_catalog
from shared.errors import ConfigError
from shared.rows import read_rows
from shared.signing import load_or_create_signing_key

log = logging.getLogger(__name__)

CLIENT_EXIT_GRACE_SECONDS = 120.0
SIMULATION_MAX_WAIT_SECONDS = 600.0


@dataclass(frozen=True)
class ClientProfile:
    """The device class a simulated client plays, and the memory cap it runs under.

    Attributes:
        device_class: Catalog class name (``join --profile``).
        memory_limit_bytes: Cap on the client process (``join --memory-limit``).
    """

    device_class: str
    memory_limit_bytes: int

    def join_args(self) -> list[str]:
        """The ``join`` flags that make a client play this profile."""
        return ["--profile", self.device_class, "--memory-limit", str(self.memory_limit_bytes)]

    def describe(self) -> str:
        """``"cpu-8gb under 1.20 GiB"``."""
        return f"{self.device_class} under {describe_bytes(self.memory_limit_bytes)}"


def parse_client_profile(entry: str, catalog: Catalog | None = None) -> ClientProfile:
    """One ``--profiles`` entry, ``CLASS[:SIZE]``, as the profile a client plays.

    Args:
        entry: e.g. ``"jetson-orin-nano-8gb:1.5GiB"`` or ``"cpu-8gb"``.
        catalog: Catalog the class must be in (default: the shipped one).

    Returns:
        The class and the cap: SIZE when given, else the class's usable memory
        (:attr:`~hardware_profiles.profile.DeviceClass.usable_bytes`).

    Raises:
        ConfigError: An empty entry, an unknown class (the message lists the known ones) or
            a SIZE that is not a size.
    """
    name, _, size = entry.strip().partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"--profiles entry {entry!r} names no device class: write CLASS or CLASS:SIZE, e.g. cpu-8gb:1.5GiB")
    cls = (catalog if catalog is not None else load_catalog()).get(name)
    limit = parse_bytes(size, f"--profiles {name}: size") if size.strip() else cls.usable_bytes
    return ClientProfile(cls.name, limit)


@dataclass(frozen=True)
class SimulationOptions:
    """How the simulated clients are made.

    Attributes:
        clients: Number of client processes.
        partition: ``iid`` or ``dirichlet`` (non-IID label skew).
        dirichlet_alpha: Concentration of the Dirichlet split (smaller = more skewed).
        examples_per_client: Training examples each client holds at most.
        profiles: ``CLASS[:SIZE]`` per client (cycled): the device class it plays and the
            memory cap it runs under (see :func:`parse_client_profile`); empty = each client
            detects its own hardware and runs uncapped.
        data: A JSONL / CSV file of training rows in the task's format, dealt to the clients;
            "" = the task preset's train split.
    """

    clients: int = 3
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    examples_per_client: int = 200
    profiles: tuple[str, ...] = ()
    data: str = ""

    def __post_init__(self) -> None:
        if self.clients < 1:
            raise ConfigError(f"--clients must be at least 1, got {self.clients}")
        if self.partition not in ("iid", "dirichlet"):
            raise ConfigError(f"--partition must be 'iid' or 'dirichlet', got {self.partition!r}")
        if self.dirichlet_alpha <= 0:
            raise ConfigError(f"--dirichlet-alpha must be > 0, got {self.dirichlet_alpha}")
        if self.examples_per_client < 1:
            raise ConfigError(f"--examples-per-client must be at least 1, got {self.examples_per_client}")
        self.client_profiles()  # a bad entry fails here, before any data is written or process started

    def client_profiles(self) -> list[ClientProfile]:
        """The parsed ``profiles`` entries, in order (empty when none are given).

        Raises:
            ConfigError: An entry names an unknown class or a bad size.
        """
        if not self.profiles:
            return []
        catalog = load_catalog()
        return [parse_client_profile(entry, catalog) for entry in self.profiles]


def partition_rows(
    rows: list[dict], clients: int, *, scheme: str, alpha: float, per_client: int, seed: int, label_of=None
) -> list[list[dict]]:
    """Split rows across clients.

    Args:
        rows: The training rows.
        clients: Number of shares.
        scheme: ``iid`` (shuffle and deal) or ``dirichlet`` (each label's rows spread by
            proportions drawn from Dirichlet(alpha), the usual non-IID benchmark split).
        alpha: Dirichlet concentration.
        per_client: Cap on each share.
        seed: Seed; the same seed gives the same split.
        label_of: A row's label (an int), for ``dirichlet``; default: its ``label`` field.

    Returns:
        ``clients`` lists of rows (each non-empty when there are enough rows).
    """
    label_of = label_of or (lambda row: row["label"])
    rng = random.Random(seed)
    shuffled = list(rows)
    rng.shuffle(shuffled)
    if scheme == "iid":
        shares = [shuffled[i::clients] for i in range(clients)]
    else:
        shares = [[] for _ in range(clients)]
        labels = [label_of(r) for r in shuffled]
        for label in sorted(set(labels), key=str):
            of_label = [r for r, y in zip(shuffled, labels) if y == label]
            weights = [rng.gammavariate(alpha, 1.0) for _ in range(clients)]
            total = sum(weights)
            start = 0
            for i, w in enumerate(weights):
                end = len(of_label) if i == clients - 1 else start + round(len(of_label) * w / total)
                shares[i].extend(of_label[start:end])
                start = end
        for share in shares:
            rng.shuffle(share)
    return [share[:per_client] for share in shares]


def training_rows(config: RunConfig, options: SimulationOptions) -> tuple[list[dict], str]:
    """The rows the clients share, and where they came from.

    ``--data``'s rows are checked against the task here, so a file that does not fit it fails
    before any process starts (with its line); the preset's train split never overlaps its test split.

    Raises:
        ConfigError: Neither ``--data`` nor a task preset.
        DataError: A row that does not fit the task.
    """
    task = config.task.spec()
    if options.data:
        numbered = read_rows(options.data)
        task.examples(numbered, options.data)
        return [row for _, row in numbered], options.data
    if not config.task.preset:
        raise ConfigError("simulate needs training data: pass --data FILE, or use a task preset")
    train, _test = task_split(config.task.preset, seed=config.evaluation.split_seed)
    return train, f"the {config.task.preset} train split"


def write_client_data(config: RunConfig, options: SimulationOptions, run_dir: Path) -> list[Path]:
    """Write each simulated client's share of the training rows as JSONL.

    Dirichlet splits need labels: classification and multiple-choice tasks have them, a
    generation task is dealt IID.

    Returns:
        One data file per client.
    """
    task = config.task.spec()
    rows, _source = training_rows(config, options)
    scheme = options.partition
    if scheme == "dirichlet" and task.kind == "generation":
        raise ConfigError("a Dirichlet split is by label: a generation task has none, use --partition iid")
    shares = partition_rows(
        rows, options.clients, scheme=scheme, alpha=options.dirichlet_alpha,
        per_client=options.examples_per_client, seed=config.seed, label_of=task.label_of,
    )
    paths = []
    for i, share in enumerate(shares):
        if not share:
            raise ConfigError(f"client {i} got no data: use more examples or a larger --dirichlet-alpha")
        path = run_dir / "clients" / client_name(i) / "data.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in share))
        paths.append(path)
    return paths


def client_name(index: int) -> str:
    """The client id of simulated client ``index``."""
    return f"client-{index}"


class ClientFleet:
    """The simulated client processes (``python -m edge_client join ...``)."""

    def __init__(self, config: RunConfig, options: SimulationOptions, data: list[Path], run_dir: Path, coordinator_key: str) -> None:
        self.config = config
        self.coordinator_key = coordinator_key  # the public key each client pins
        self.options = options
        self.data = data
        self.run_dir = run_dir
        self.processes: list[subprocess.Popen] = []

    def start(self, host: str, port: int) -> None:
        """Start one ``join`` process per client against the broker at ``host:port``."""
        env = dict(os.environ)
        # Share the cores instead of oversubscribing them: N clients x all threads thrashes.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.options.clients))
        profiles = self.options.client_profiles()
        for i, data in enumerate(self.data):
            folder = data.parent
            argv = [
                sys.executable, "-m", "edge_client", "join",
                "--broker", f"{host}:{port}", "--run", self.config.run_id, "--client-id", client_name(i),
                "--data", str(data), "--state-dir", str(folder / "state"), "--coordinator-key", self.coordinator_key,
                "--json",
            ]
            if profiles:
                played = profiles[i % len(profiles)]
                argv += played.join_args()
                log.info("%s plays %s", client_name(i), played.describe())
            log_file = (folder / "client.log").open("w")
            self.processes.append(
                subprocess.Popen(argv, stdout=(folder / "outcome.json").open("w"), stderr=log_file, env=env)
            )

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Wait for the clients to leave (they do once the schedule says finished).

        Returns:
            Each client's JSON outcome (``{"status": "missing"}`` when it printed none).
        """
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.terminate()
                proc.wait(timeout=10)
        outcomes = []
        for i, proc in enumerate(self.processes):
            folder = self.run_dir / "clients" / client_name(i)
            text = (folder / "outcome.json").read_text().strip()
            outcomes.append(json.loads(text) if text else _no_outcome(client_name(i), proc.returncode, folder / "client.log"))
        return outcomes

    def stop(self) -> None:
        """Terminate clients still running (on error or interrupt)."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()


def _no_outcome(client_id: str, returncode: int | None, log_file: Path) -> dict[str, Any]:
    """The outcome of a client that printed none: it stopped on an error (out of memory under
    its cap, say) whose message is the last ``error:`` line of its log."""
    try:
        lines = log_file.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    errors = [line.strip() for line in lines if line.strip().startswith("error:")]
    reason = f"exited with status {returncode}: {errors[-1]}" if errors else f"exited with status {returncode}; see {log_file}"
    return {"client_id": client_id, "status": "missing" if returncode is None else "failed", "reason": reason}


def bounded_wait(config: RunConfig) -> RunConfig:
    """The config with ``rounds.max_wait_s`` set where it is unset.

    A simulation's clients are its own child processes: one that stops on an error (out of
    memory under its cap, say) never comes back, so waiting for ever for ``min_clients``
    would hang ``simulate``. It fails the run after :data:`SIMULATION_MAX_WAIT_SECONDS`
    instead, with the clients' outcomes saying why they left. A value the user set stands.
    """
    if config.rounds.max_wait_s is not None:
        return config
    return dataclasses.replace(config, rounds=dataclasses.replace(config.rounds, max_wait_s=SIMULATION_MAX_WAIT_SECONDS))


def precisions_for_profiles(config: RunConfig, profiles: list[ClientProfile], catalog: Catalog | None = None) -> tuple[RunConfig, str]:
    """The run's config with the package precision its played classes need added.

    A class whose bitsandbytes wheel has no 4-bit kernels (a Jetson) cannot train an nf4
    package; it trains the tier's ``bf16`` package instead (played on this CPU, bf16 always
    runs), so ``bf16`` joins ``pruning.extra_precisions`` when such a class plays in a run
    whose packages are all nf4. A user's own extra precisions are kept as they are.

    Returns:
        The config (the same object when nothing is added) and one line saying what was
        added and for which classes ("" when nothing was).
    """
    pruning = config.pruning
    if any(p != "nf4" for p in [pruning.precision, *pruning.extra_precisions]):
        return config, ""
    catalog = catalog if catalog is not None else load_catalog()
    without_4bit = sorted({p.device_class for p in profiles if not catalog.get(p.device_class).supports_4bit})
    if not without_4bit:
        return config, ""
    extended = dataclasses.replace(pruning, extra_precisions=[*pruning.extra_precisions, "bf16"])
    note = f"{', '.join(without_4bit)} cannot run nf4 packages: every tier is also published in bf16 (pruning.extra_precisions)"
    return dataclasses.replace(config, pruning=extended), note


def simulate(config: RunConfig, options: SimulationOptions, run_dir: Path, *, progress: Progress = lambda _m: None) -> tuple[RunOutcome, list[dict[str, Any]]]:
    """Run a whole federated fine-tuning on this machine.

    Args:
        config: Run configuration (the broker is forced to the embedded one).
        options: Client fleet settings.
        run_dir: Run directory (a fresh one).
        progress: Status messages.

    Returns:
        The coordinator's outcome and each client's outcome.
    """
    # Every process is on this machine: the embedded broker listens on loopback (it takes anyone).
    config = dataclasses.replace(config, broker=dataclasses.replace(config.broker, mode="embedded", host="127.0.0.1", port=0))
    config = bounded_wait(config)
    config, note = precisions_for_profiles(config, options.client_profiles())
    if note:
        progress(note)
    run_dir = Path(run_dir)
    data = write_client_data(config, options, run_dir)
    task = config.task.spec()
    progress(
        f"wrote {options.partition} shares of {options.data or task.name} ({task.kind}) for {options.clients} "
        f"clients under {run_dir / 'clients'}"
    )
    # The server loads the same key file; its public key goes to the clients on their command line.
    key = load_or_create_signing_key(signing_key_file(config.broker, run_dir))
    fleet = ClientFleet(config, options, data, run_dir, key.public.text)
    try:
        outcome = serve_run(config, run_dir, progress=progress, on_broker=fleet.start)
        clients = fleet.wait(CLIENT_EXIT_GRACE_SECONDS)
    finally:
        fleet.stop()
    (run_dir / "clients.json").write_text(json.dumps(clients, indent=2))
    return outcome, clients
