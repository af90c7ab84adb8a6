"""Soak: a long federated run on this machine while a chaos loop kills clients and the broker.

One real run, the same processes a user starts: a local mosquitto (persistence on, but a
SIGKILL loses everything since its last save, i.e. its retained messages and sessions),
``fedsoda-coordinator serve`` and N ``fedsoda-client join`` processes, on the 4-layer cut of
the real SmolLM2-135M packaged in 4 bits (strategy ``fedpetuning``: no SGP/ODA), one
training step of 2 x 16 tokens per round, so that a round costs seconds and the time goes
into the faults. Rounds need half the clients online and close when every live assigned
client reported (quorum N/4) or at a 30 s deadline.

The chaos loop (seeded ``random.Random``) waits until round 1 runs, then every 3-8 s
injects one fault:

* ``broker`` (every third fault, but not during the last round): SIGKILL the broker,
  restart it 0.5-3 s later on the same port; everyone reconnects, the coordinator publishes
  its retained state again;
* ``client`` (the others): SIGKILL a random running client (its Last Will marks it
  offline), restart it 1-4 s later with the same id and state folder.

Before each fault the updates the coordinator has accepted so far (its persisted update
files) are noted. After the run, the run directory is audited
(``benchmarks.harness.audit_run``): each round's saved global adapter must be FedAvg of the
previous one and of exactly the round's accepted updates, each once. Reported: rounds completed, faults injected, updates
accepted, updates lost (accepted before a fault but missing from the aggregates; target 0),
updates counted twice (target 0), and what the faults cost: repeated deliveries ignored,
late updates refused, clients' updates acknowledged by the broker but never counted.

The fault sequence is seeded; where faults land in the run depends on this machine's speed.

Writes benchmarks/results/soak.json, soak.md and soak.png (rounds over time, faults marked).

Usage: ``python benchmarks/soak.py [--rounds 20] [--clients 8] [--seed 0] [--quick] [--out-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.harness import Federation, audit_run, light_settings  # noqa: E402
from coordinator.simulate import client_name  # noqa: E402
from shared.mosquitto import start_mosquitto  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
CUT_LAYERS = 4
ROUND_TIMEOUT_S = 30.0
FAULT_GAP_S = (3.0, 8.0)
CLIENT_DOWN_S = (1.0, 4.0)
BROKER_DOWN_S = (0.5, 3.0)
RUN_TIMEOUT_S = 3600.0


@dataclass
class Chaos:
    """The chaos loop's state: what is down, what was injected, what was accepted before.

    Args:
        fed: The run.
        rng: Seeded random source.
        rounds: Rounds of the run (no broker fault during the last one: the coordinator's
            final "finished" schedule must reach the clients).
        max_faults: Stop injecting after this many (None: until the run ends).
        gap: Seconds between faults (uniform range); the first one comes once round 1 runs.
        broker_every: Every this many faults, kill the broker rather than a client.
    """

    fed: Federation
    rng: random.Random
    rounds: int
    max_faults: int | None = None
    gap: tuple[float, float] = FAULT_GAP_S
    broker_every: int = 3
    faults: list[dict] = field(default_factory=list)
    accepted_before: set[tuple[int, str]] = field(default_factory=set)
    down: dict[str, float] = field(default_factory=dict)  # "broker" or a client -> restart time
    next_fault: float | None = None
    t0: float = field(default_factory=time.monotonic)
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds, rounds aggregated)

    def step(self) -> bool:
        """One turn of the loop: restart what is due, inject what is due. True once the run ended."""
        now = time.monotonic()
        for name, due in list(self.down.items()):
            if now >= due:
                del self.down[name]
                if name == "broker":
                    self.fed.broker.start()
                else:
                    self.fed.join(name)
        round_, phase = self.fed.phase()
        done = sum(self.fed.aggregated(r) for r in range(1, self.rounds + 1))
        if not self.progress or self.progress[-1][1] != done:
            self.progress.append((now - self.t0, done))
        if not self.fed.procs.running("coordinator"):
            return True
        if self.next_fault is None:
            if round_ >= 1:
                self.next_fault = now + self.rng.uniform(*self.gap)
        elif now >= self.next_fault and (self.max_faults is None or len(self.faults) < self.max_faults):
            self._inject(now, round_, phase)
            self.next_fault = now + self.rng.uniform(*self.gap)
        return False

    def _inject(self, now: float, round_: int, phase: str) -> None:
        running = [c for c in self.fed.clients if c not in self.down and self.fed.procs.running(c)]
        broker_ok = "broker" not in self.down and round_ < self.rounds
        kind = "broker" if (len(self.faults) + 1) % self.broker_every == 0 and broker_ok else "client"
        pick = self.rng.randrange(1 << 30)
        if kind == "client" and not running:
            return
        self.accepted_before |= self.fed.accepted()
        if kind == "broker":
            target, down_s = "broker", self.rng.uniform(*BROKER_DOWN_S)
            self.fed.broker.kill()
        else:
            target, down_s = running[pick % len(running)], self.rng.uniform(*CLIENT_DOWN_S)
            self.fed.procs.kill(target)
        self.down[target] = now + down_s
        self.faults.append({"t_s": round(now - self.t0, 2), "kind": kind, "target": target, "round": round_,
                            "phase": phase, "down_s": round(down_s, 2)})
        print(f"[{now - self.t0:7.1f} s] fault {len(self.faults)}: killed {target} in round {round_} ({phase}), "
              f"back in {down_s:.1f} s", flush=True)


def machine() -> dict:
    """Where the benchmark ran."""
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": list(os.getloadavg()),
    }


def run(rounds: int, clients: int, seed: int, out_dir: Path, *, quick: bool = False, keep: bool = False) -> dict:
    """Run the soak and write soak.json / .md / .png into ``out_dir``.

    Args:
        rounds: Federated rounds.
        clients: Client processes.
        seed: Seed of the chaos loop.
        out_dir: Output folder (created).
        quick: Smoke run: a single fault (a broker kill once round 1 runs).
        keep: Keep the run's folder (logs, run directory) even when it succeeds.

    Returns:
        The result dict written to soak.json.
    """
    from coordinator.model.models import bundled_model_path, cut_model_copy
    from shared.config import cache_dir

    start = time.perf_counter()
    info = machine()
    model = cut_model_copy(bundled_model_path(), cache_dir() / "test-models" / f"smollm2-cut{CUT_LAYERS}", CUT_LAYERS)
    root = Path(tempfile.mkdtemp(prefix="fedsoda-soak-"))
    broker = start_mosquitto()
    min_clients = max(1, clients // 2)
    settings = light_settings(
        "soak", model, broker.port,
        rounds={"rounds": rounds, "min_clients": min_clients, "quorum": max(1, clients // 4),
                "round_timeout_s": ROUND_TIMEOUT_S, "max_extensions": 50},
    )
    names = [client_name(i) for i in range(clients)]
    fed = Federation.create(root, broker, settings, names)
    # Quick: one fault, a broker kill as soon as round 1 runs (restarting a client process
    # alone would cost most of a smoke run's budget); full: faults at random until the end.
    chaos = Chaos(fed, random.Random(seed), rounds, max_faults=1 if quick else None,
                  gap=(0.0, 0.0) if quick else FAULT_GAP_S, broker_every=1 if quick else 3)
    ok = False
    try:
        fed.serve()
        for name in names:
            fed.join(name)
        fed.wait(chaos.step, "the run to finish", RUN_TIMEOUT_S, watch=())
        for name in list(chaos.down):  # bring back what the last fault took down
            chaos.down[name] = 0.0
        chaos.step()
        report = fed.finish(300.0)
        ledger = audit_run(fed.run_dir, chaos.accepted_before)
        ok = not ledger.problems
    finally:
        fed.procs.kill_all()
        broker.close()
        if ok and not keep:
            shutil.rmtree(root, ignore_errors=True)
    sent = {(r, c) for c in names for r in fed.rounds_sent(c)}
    records = report["rounds"]
    by_kind = {k: sum(f["kind"] == k for f in chaos.faults) for k in ("client", "broker")}
    result = {
        "quick": quick,
        "machine": info,
        "config": {"rounds": rounds, "clients": clients, "seed": seed, "min_clients": min_clients, "broker_every": chaos.broker_every,
                   "quorum": max(1, clients // 4), "round_timeout_s": ROUND_TIMEOUT_S,
                   "model": f"SmolLM2-135M cut to {CUT_LAYERS} layers, nf4", "training": settings["training"],
                   "fault_gap_s": list(chaos.gap), "client_down_s": list(CLIENT_DOWN_S), "broker_down_s": list(BROKER_DOWN_S)},
        "finished": ledger.finished,
        "rounds_completed": ledger.rounds_aggregated,
        "faults_injected": len(chaos.faults),
        "faults_by_kind": by_kind,
        "updates_accepted": len(ledger.accepted),
        "accepted_before_a_fault": len(chaos.accepted_before),
        "updates_lost": len(ledger.lost),
        "updates_counted_twice": ledger.double_counted + len(ledger.mismatched_rounds),
        "problems": list(ledger.problems),
        "duplicate_deliveries_ignored": ledger.duplicates,
        "late_updates_refused": ledger.late,
        "rejected_updates": ledger.rejected,
        "dropouts": sum(r["dropouts"] for r in records),
        "acked_by_broker_not_counted": len(sent - ledger.accepted),
        "round_seconds": [round(r["closed_at"] - r["started_at"], 2) for r in records if r["closed_at"] is not None],
        "faults": chaos.faults,
        "progress": [[round(t, 2), n] for t, n in chaos.progress],
        "runtime_s": time.perf_counter() - start,
        "run_folder": str(root) if (keep or not ok) else None,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "soak.md").write_text(markdown(result))
    plot(result, out_dir / "soak.png")
    return result


def markdown(result: dict) -> str:
    """The results as a markdown report."""
    c, m = result["config"], result["machine"]
    secs = result["round_seconds"]
    lines = [
        "# Soak: rounds under chaos",
        "",
        f"Machine: {m['cpu_count']} CPUs, Python {m['python']}, {m['platform']}; load average at start "
        f"{m['load_avg_at_start'][0]:.1f}." + (" Quick (smoke) run." if result["quick"] else ""),
        "",
        f"{c['clients']} client processes and the coordinator on {c['model']}, {c['rounds']} rounds "
        f"({c['training']['local_steps']} local step of {c['training']['batch_size']} x {c['training']['seq_len']} tokens), "
        f"min_clients {c['min_clients']}, quorum {c['quorum']}, deadline {c['round_timeout_s']:.0f} s; mosquitto. "
        f"Chaos seed {c['seed']}: a fault every {c['fault_gap_s'][0]:.0f}-{c['fault_gap_s'][1]:.0f} s once round 1 "
        f"runs, {_which(c['broker_every'])} the broker (SIGKILLed, restarted after {c['broker_down_s'][0]:.1f}-"
        f"{c['broker_down_s'][1]:.0f} s), the others a random client (SIGKILLed, restarted after "
        f"{c['client_down_s'][0]:.0f}-{c['client_down_s'][1]:.0f} s).",
        "",
        "| | |",
        "|---|---:|",
        f"| rounds completed | {result['rounds_completed']} of {c['rounds']}"
        f"{'' if result['finished'] else ' (run did not finish)'} |",
        f"| faults injected | {result['faults_injected']} ({result['faults_by_kind']['client']} client kills, "
        f"{result['faults_by_kind']['broker']} broker kills) |",
        f"| updates accepted (counted in an aggregate) | {result['updates_accepted']} |",
        f"| updates lost (accepted before a fault, missing from the aggregates; target 0) | **{result['updates_lost']}** |",
        f"| updates counted twice (target 0) | **{result['updates_counted_twice']}** |",
        f"| repeated deliveries recognised and ignored | {result['duplicate_deliveries_ignored']} |",
        f"| late updates refused (round already closed) | {result['late_updates_refused']} |",
        f"| client updates acknowledged by the broker but never counted | {result['acked_by_broker_not_counted']} |",
        f"| dropouts (assigned, not reported when the round closed) | {result['dropouts']} |",
        f"| round duration, median / max | {_median(secs):.1f} s / {max(secs, default=0.0):.1f} s |",
        f"| wall time | {result['runtime_s']:.0f} s |",
        "",
        "Lost and counted-twice come from an audit of the run directory: every round's saved global "
        "adapter is recomputed as FedAvg of the previous one and of the round's persisted updates, each "
        "once, and the updates the coordinator had accepted before each fault must all be counted.",
    ]
    if result["problems"]:
        lines += ["", "Problems found:", "", *(f"- {p}" for p in result["problems"])]
    return "\n".join(lines) + "\n"


def _which(every: int) -> str:
    return "each one kills" if every == 1 else f"every {({2: 'second', 3: 'third'}).get(every, f'{every}th')} one kills"


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return 0.0 if not s else (s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)


def plot(result: dict, path: Path) -> None:
    """Rounds completed over time, with each fault marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    pts = result["progress"]
    if pts:
        xs = [t for t, _ in pts] + [result["runtime_s"]]
        ys = [n for _, n in pts] + [pts[-1][1]]
        ax.step(xs, ys, where="post", color="black", label="rounds completed")
    for kind, color in (("client", "tab:orange"), ("broker", "tab:red")):
        ts = [f["t_s"] for f in result["faults"] if f["kind"] == kind]
        for i, t in enumerate(ts):
            ax.axvline(t, color=color, alpha=0.6, lw=1, label=f"{kind} killed" if i == 0 else None)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel("rounds aggregated")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"Soak: {result['config']['clients']} clients, {result['faults_injected']} faults, "
                 f"{result['updates_lost']} updates lost")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    """Command line entry point; prints the markdown report.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The result dict.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds (default 20)")
    parser.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the chaos loop")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 3 clients, one broker kill")
    parser.add_argument("--keep", action="store_true", help="keep the run folder (logs, run directory)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args(argv)
    rounds, clients = (2, 3) if args.quick else (args.rounds, args.clients)
    result = run(rounds, clients, args.seed, args.out_dir, quick=args.quick, keep=args.keep)
    print(markdown(result))
    if result["problems"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up the children on SIGTERM too
    main()
