"""Real serve/join processes on a broker, and the audit of a run directory.

Used by the soak benchmark and by the fault and integration tests (benchmarks never import tests):

* :class:`Processes` starts ``python -m coordinator serve`` / ``python -m edge_client join``
  children with their output in one log file each, can stop, continue or kill them, and
  kills whatever is left at the end;
* :func:`wait_until` polls a condition with a deadline (progress-based: files in the run
  directory, lines in the logs), failing early when a watched process dies;
* :class:`Federation` bundles one run (its broker, config, run directory, clients' data and
  state folders) with the progress markers callers wait on; :func:`light_settings` sizes
  its config so that a round costs seconds;
* :func:`audit_run` / :func:`check_ledger` check, from the run directory alone, that every
  accepted update is in its round's aggregate exactly once (the global adapter of each
  round is recomputed with FedAvg from the previous one and the persisted updates) and that
  the updates accepted before a fault are among them.

Every wait is bounded and driven by progress, never by a bare sleep. Failures raise
``AssertionError`` so that pytest reports them as test failures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.broker import BrokerHandle

POLL_SECONDS = 0.1
"""How often conditions on files written by other processes are polled."""


class Processes:
    """Child processes of a test, each logging to ``<root>/<name>.log``; killed at the end.

    Args:
        root: Folder for the log files.
        env: Extra environment for every child.
    """

    def __init__(self, root: Path, env: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.procs: dict[str, subprocess.Popen] = {}
        # One thread per child: a handful of processes share this machine's cores.
        self.env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))

    def start(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start ``python <argv>`` as ``name`` (a restart appends to the same log).

        Args:
            name: Process name (its log is ``<name>.log``).
            argv: Arguments after the interpreter.
            env: Extra environment for this child only.

        Returns:
            The process.
        """
        with (self.root / f"{name}.log").open("a") as log:
            proc = subprocess.Popen(
                [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env={**self.env, **(env or {})}
            )
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        """Everything ``name`` has printed so far (all its incarnations)."""
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def running(self, name: str) -> bool:
        """Whether ``name`` was started and has not exited."""
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to ``name`` (SIGSTOP freezes it, SIGCONT thaws it)."""
        self.procs[name].send_signal(sig)

    def kill(self, name: str) -> None:
        """SIGKILL ``name`` (as a crash would) and reap it."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)

    def stopped(self, name: str) -> bool:
        """Whether ``name`` is stopped (state ``T`` in /proc: it sent itself SIGSTOP, or we did)."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return False
        try:
            stat = Path(f"/proc/{proc.pid}/stat").read_text()
        except OSError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] in ("T", "t")

    def kill_all(self) -> None:
        """Kill every child still running (stopped ones too)."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def wait_until(
    condition: Callable[[], bool],
    what: str,
    timeout: float,
    procs: Processes,
    watch: Iterable[str] = ("coordinator",),
) -> None:
    """Poll ``condition`` until it holds, failing after ``timeout`` or if a watched process exits.

    Args:
        condition: The progress to wait for.
        what: Description for the failure message.
        timeout: Seconds allowed.
        procs: The test's processes (their logs go into the failure message).
        watch: Processes that must stay alive meanwhile.

    Raises:
        AssertionError: Timed out, or a watched process exited.
    """
    watch = list(watch)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        for name in watch:
            proc = procs.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"{name} exited ({proc.returncode}) while waiting for {what}:\n{procs.log(name)[-4000:]}")
        time.sleep(POLL_SECONDS)  # polling files written by other processes; bounded by the deadline
    logs = "\n".join(f"--- {name}.log\n{procs.log(name)[-3000:]}" for name in procs.procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")


def toml_text(settings: Mapping[str, Any]) -> str:
    """A TOML document from ``{"key": value, "section": {"key": value}}`` (scalars and lists)."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(str(v))

    top = [f"{k} = {value(v)}" for k, v in settings.items() if not isinstance(v, Mapping)]
    sections = [
        f"\n[{name}]\n" + "\n".join(f"{k} = {value(v)}" for k, v in body.items())
        for name, body in settings.items()
        if isinstance(body, Mapping)
    ]
    return "\n".join(top) + "\n" + "\n".join(sections) + "\n"


def client_rows(n_clients: int, per_client: int) -> list[list[dict]]:
    """Real Rotten Tomatoes training rows, ``per_client`` for each of ``n_clients`` clients."""
    from coordinator.model.datasets import movie_reviews, train_test_split

    train, _ = train_test_split(movie_reviews("rotten_tomatoes"), seed=0)
    return [train[i * per_client:(i + 1) * per_client] for i in range(n_clients)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Write ``rows`` as JSONL to ``path`` (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def light_settings(run_id: str, model_dir: Path, port: int, **sections: Mapping[str, Any]) -> dict[str, Any]:
    """A run config sized for fault tests: the whole (cut) model as one 4-bit tier, one tiny step a round.

    ``fedpetuning`` skips SGP and ODA, so preparing the run costs only packaging; no
    evaluation at the end. ``sections`` override keys section by section, e.g.
    ``rounds={"rounds": 3}``.

    Returns:
        The settings for :func:`toml_text`.
    """
    settings: dict[str, Any] = {
        "run_id": run_id,
        "seed": 1,
        "model": {"model": str(model_dir)},
        "method": "fedpetuning",
        "rounds": {"rounds": 2, "min_clients": 2, "quorum": 1, "round_timeout_s": 120.0, "max_extensions": 10},
        "training": {
            "local_steps": 1, "batch_size": 2, "seq_len": 16, "lora_rank": 2, "lora_alpha": 4.0,
            "learning_rate": 0.002, "target_modules": ["q_proj", "v_proj"],
        },
        "evaluation": {"enabled": False},
        "broker": {"host": "127.0.0.1", "port": port},
    }
    for name, body in sections.items():
        settings[name] = {**settings.get(name, {}), **body}
    return settings


@dataclass
class Federation:
    """One run of real processes against ``broker`` (see the module docstring).

    Attributes:
        root: The test's folder (logs, config, run directory, clients' folders).
        broker: The broker everyone connects to.
        run_id: The run's id.
        config: The run's TOML config file.
        procs: The processes.
        clients: Client name -> its data file.
    """

    root: Path
    broker: BrokerHandle
    run_id: str
    config: Path
    procs: Processes
    clients: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(
        cls, root: Path, broker: BrokerHandle, settings: Mapping[str, Any], clients: Iterable[str], *,
        per_client: int = 16, env: Mapping[str, str] | None = None,
    ) -> Federation:
        """Write the config and each client's data (disjoint real rows) under ``root``."""
        names = list(clients)
        config = root / "run.toml"
        config.write_text(toml_text(settings))
        data = {
            name: write_rows(root / name / "data.jsonl", rows)
            for name, rows in zip(names, client_rows(len(names), per_client))
        }
        return cls(root, broker, str(settings["run_id"]), config, Processes(root, env), data)

    @property
    def run_dir(self) -> Path:
        """The coordinator's run directory."""
        return self.root / "run"

    # ------------------------------------------------------------------ processes

    @property
    def signing_key_file(self) -> Path:
        """The coordinator's signing key (``serve --signing-key``), made before any process starts."""
        return self.root / "coordinator.key"

    def coordinator_pub(self) -> Path:
        """The public key file the clients pin (``join --coordinator-key``); creates the key pair if absent."""
        from shared.signing import load_or_create_signing_key, public_key_file

        load_or_create_signing_key(self.signing_key_file)
        return public_key_file(self.signing_key_file)

    def serve(self, *, resume: bool = False, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start (or, with ``resume``, restart) ``fedsoda-coordinator serve`` as "coordinator"."""
        self.coordinator_pub()  # the key exists before the first client pins it
        argv = ["-m", "coordinator", "serve", "--config", str(self.config), "--run-dir", str(self.run_dir),
                "--signing-key", str(self.signing_key_file)]
        return self.procs.start("coordinator", [*argv, "--resume"] if resume else argv, env=env)

    def join(self, name: str, *extra: str, env: Mapping[str, str] | None = None) -> subprocess.Popen:
        """Start (or restart: same id and state folder) ``fedsoda-client join`` for ``name``."""
        return self.procs.start(name, [
            "-m", "edge_client", "join", "--broker", f"{self.broker.host}:{self.broker.port}", "--run", self.run_id,
            "--client-id", name, "--data", str(self.clients[name]), "--state-dir", str(self.state_dir(name)),
            "--coordinator-key", str(self.coordinator_pub()), "--json", *extra,
        ], env=env)

    def wait(self, condition: Callable[[], bool], what: str, timeout: float, watch: Iterable[str] = ("coordinator",)) -> None:
        """:func:`wait_until` on this federation's processes."""
        wait_until(condition, what, timeout, self.procs, watch)

    def finish(self, timeout: float, clients: Iterable[str] | None = None) -> dict[str, Any]:
        """Wait for the coordinator to finish the run and the clients to leave; return report.json.

        Raises:
            AssertionError: A process did not exit in time or exited with an error.
        """
        self.wait(lambda: not self.procs.running("coordinator"), "the run to finish", timeout, watch=())
        coordinator = self.procs.procs["coordinator"]
        assert coordinator.returncode == 0, self.procs.log("coordinator")[-4000:]
        for name in clients if clients is not None else self.clients:
            self.wait(lambda n=name: not self.procs.running(n), f"{name} to leave", 120.0, watch=())
            assert self.procs.procs[name].returncode == 0, f"{name}:\n{self.procs.log(name)[-4000:]}"
        return self.report()

    # ------------------------------------------------------------------ progress markers

    def state_dir(self, name: str) -> Path:
        """Client ``name``'s state folder (chunk cache, rounds sent, checkpoints)."""
        return self.root / name / "state"

    def accepted(self) -> set[tuple[int, str]]:
        """Every update the coordinator has accepted so far, as ``(round, client)`` (persisted files)."""
        out = set()
        for meta in (self.run_dir / "updates").glob("round_*/*.json"):
            if not meta.name.startswith("."):
                out.add((int(meta.parent.name.split("_")[1]), json.loads(meta.read_text())["client_id"]))
        return out

    def accepted_in(self, round_: int) -> set[str]:
        """Clients whose update for ``round_`` was accepted so far."""
        return {c for r, c in self.accepted() if r == round_}

    def aggregated(self, round_: int) -> bool:
        """Whether the global adapter of ``round_`` was saved."""
        return (self.run_dir / "global" / f"round_{round_:04d}.safetensors").exists()

    def state(self) -> dict[str, Any]:
        """The coordinator's state.json ({} before it exists)."""
        path = self.run_dir / "state.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    def phase(self) -> tuple[int, str]:
        """``(round, phase)`` from state.json."""
        state = self.state()
        return int(state.get("round", 0)), str(state.get("phase", ""))

    def training(self, name: str, round_: int) -> bool:
        """Whether client ``name`` has said it is training ``round_`` (its log)."""
        return f"round {round_}: training" in self.procs.log(name)

    def chunks(self, name: str) -> int:
        """Verified sub-LLM chunks in client ``name``'s cache."""
        folder = self.state_dir(name) / "chunks"
        return sum(1 for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() else 0

    def rounds_sent(self, name: str) -> list[int]:
        """Rounds client ``name`` has recorded as sent (its state file: acknowledged by the broker)."""
        from edge_client.outbox import STATE_FILE

        path = self.state_dir(name) / STATE_FILE
        return json.loads(path.read_text()).get("rounds_sent", []) if path.is_file() else []

    def outcome(self, name: str) -> dict[str, Any]:
        """The JSON outcome client ``name`` printed last (its final line of ``--json`` output)."""
        for line in reversed(self.procs.log(name).splitlines()):
            if line.startswith("{") and '"client_id"' in line:
                return json.loads(line)
        raise AssertionError(f"{name} printed no outcome:\n{self.procs.log(name)[-3000:]}")

    def report(self) -> dict[str, Any]:
        """The run's report.json."""
        return json.loads((self.run_dir / "report.json").read_text())


@dataclass(frozen=True)
class Ledger:
    """What :func:`audit_run` found in a finished run's directory.

    Attributes:
        finished: The run finished (report.json says so).
        rounds_aggregated: Rounds whose aggregate was saved.
        accepted: Every update counted in an aggregate, as ``(round, client)``.
        lost: Updates accepted (persisted) before a fault, or persisted for an aggregated
            round, that no aggregate counted.
        double_counted: Extra counts of an update in its round (a client listed twice).
        mismatched_rounds: Rounds whose saved global adapter is not the aggregate of the previous
            one and of the round's persisted updates, each once.
        problems: Every inconsistency, in words (empty when the run is sound).
        duplicates: Repeated deliveries the coordinator recognised and ignored.
        late: Updates refused because their round had closed.
        rejected: Updates refused by validation or assignment.
    """

    finished: bool
    rounds_aggregated: int
    accepted: frozenset[tuple[int, str]]
    lost: frozenset[tuple[int, str]]
    double_counted: int
    mismatched_rounds: tuple[int, ...]
    problems: tuple[str, ...]
    duplicates: int
    late: int
    rejected: int


def audit_run(run_dir: Path, accepted_before: Iterable[tuple[int, str]] = ()) -> Ledger:
    """Check from the run directory that every accepted update is in the aggregate exactly once.

    For every aggregated round: the clients the round counted are exactly those whose
    update was persisted, each once, with matching example counts; and the round's saved
    global adapter equals the run's aggregation (strategy and influence bounds, from the
    report's ``aggregation_settings``) of the previous round's adapter and those persisted
    deltas (so an update averaged twice, or one left out, shows), and the factors the round
    recorded are the ones those give. The final adapter is the last of that chain.

    Args:
        run_dir: The coordinator's run directory (after the run ended).
        accepted_before: Updates accepted before a fault, as ``(round, client)``: each must
            be in the aggregates.

    Returns:
        The ledger (nothing is asserted here: see :func:`check_ledger`).
    """
    import torch

    from coordinator.run.aggregation import (
        InfluenceLimits,
        aggregate_round,
        get_strategy,
    )
    from coordinator.run.checkpoint import RunDir
    from coordinator.settings import AggregationSettings

    run = RunDir(run_dir)
    report = json.loads((Path(run_dir) / "report.json").read_text())
    recorded = dict(report["aggregation_settings"])
    uniform = bool(recorded.pop("uniform_weights", False))  # DP-FedAvg weighs every update 1
    settings = AggregationSettings(**recorded)
    strategy = get_strategy(settings.strategy, **settings.strategy_options())
    limits = InfluenceLimits.from_settings(settings)
    problems: list[str] = []
    counted: set[tuple[int, str]] = set()
    persisted_all: set[tuple[int, str]] = set()
    double_counted = 0
    mismatched: list[int] = []
    previous = run.load_global(0)
    for rec in report["rounds"]:
        r = rec["round"]
        if rec["outcome"] != "aggregated":
            problems.append(f"round {r} ended {rec['outcome']}")
            continue
        reported = rec["reported"]
        double_counted += len(reported) - len(set(reported))
        persisted = run.updates(r)
        persisted_all |= {(r, u.client_id) for u in persisted}
        if sorted(u.client_id for u in persisted) != sorted(set(reported)):
            problems.append(f"round {r}: counted {sorted(reported)} but persisted {[u.client_id for u in persisted]}")
        if rec["examples"] != sum(u.num_examples for u in persisted):
            problems.append(f"round {r}: {rec['examples']} examples counted, {sum(u.num_examples for u in persisted)} persisted")
        expected, influence = aggregate_round(
            strategy, {k: v.clone() for k, v in previous.items()}, persisted, limits, uniform_weights=uniform
        )
        if run.load_influence(r) != influence:
            problems.append(f"round {r}: the recorded aggregation factors are not those its updates and settings give")
        saved = run.load_global(r)
        if set(saved) != set(expected) or any(
            not torch.allclose(saved[k], v, rtol=1e-5, atol=1e-7) for k, v in expected.items()
        ):
            mismatched.append(r)
            problems.append(f"round {r}: the saved adapter is not the aggregate of its persisted updates, each once")
        counted |= {(r, c) for c in reported}
        previous = saved
    if double_counted:
        problems.append(f"{double_counted} update(s) counted twice in their round")
    lost = (set(accepted_before) | persisted_all) - counted
    if lost:
        problems.append(f"accepted updates missing from the aggregates: {sorted(lost)}")
    if report["phase"] != "finished":
        problems.append(f"run ended {report['phase']}: {report['fail_reason']}")
    return Ledger(
        finished=report["phase"] == "finished",
        rounds_aggregated=sum(rec["outcome"] == "aggregated" for rec in report["rounds"]),
        accepted=frozenset(counted),
        lost=frozenset(lost),
        double_counted=double_counted,
        mismatched_rounds=tuple(mismatched),
        problems=tuple(problems),
        duplicates=sum(rec["duplicates"] for rec in report["rounds"]),
        late=sum(rec["late"] for rec in report["rounds"]),
        rejected=sum(rec["rejected"] for rec in report["rounds"]),
    )


def check_ledger(run_dir: Path, accepted_before: Iterable[tuple[int, str]] = ()) -> Ledger:
    """:func:`audit_run`, asserting that the run finished and is sound (no loss, nothing twice).

    Raises:
        AssertionError: With every problem found.
    """
    ledger = audit_run(run_dir, accepted_before)
    assert not ledger.problems, "\n".join(ledger.problems)
    return ledger
