"""Run reports: written when a run ends, read back as tables, CSV and PNG plots.

The coordinator writes ``report.json`` into the run directory whenever a run ends
(:func:`write_report`; ``simulate`` adds ``clients.json`` with each client's final byte
counters), and :func:`load_report` reads it back: the format is defined here, on both sides.
Clients put cumulative byte counters in every update's resource report, so per-round traffic
is the difference between a client's consecutive reports.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import RunStateError

if TYPE_CHECKING:
    from coordinator.run.aggregation.bounds import ClientInfluence, RoundInfluence
    from coordinator.run.checkpoint import RunDir
    from coordinator.run.round_state import RoundRecord, RoundState

REPORT_FILE = "report.json"

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class ServingTotals:
    """What the server counted over the run.

    Attributes:
        chunks_served: Package chunks sent to clients.
        bytes_served: Their bytes.
        refused: Refused inbound messages by reason.
        ignored: Well-formed messages with nothing to do, by kind.
        bytes_sent: Bytes the coordinator published (MQTT layer).
        bytes_received: Bytes it received.
    """

    chunks_served: int
    bytes_served: int
    refused: Mapping[str, int]
    ignored: Mapping[str, int]
    bytes_sent: int
    bytes_received: int


def round_record_dict(rec: RoundRecord) -> dict[str, Any]:
    """A round record as plain JSON types: its fields, participants as a ``{client: tier}`` map."""
    out = dataclasses.asdict(rec)
    out["participants"] = dict(rec.participants)
    out["reported"] = list(rec.reported)
    return out


def update_entries(run_dir: RunDir, rounds: Iterable[int]) -> list[dict[str, Any]]:
    """The persisted updates of ``rounds`` in the report's ``updates`` format (what :func:`per_client_rounds` reads).

    Args:
        run_dir: The run directory.
        rounds: Round numbers, in the order wanted.

    Returns:
        One dict per update (round, client, examples, metrics, resources, and, for an
        aggregated round, the weight and clip factor it was aggregated with), by round then
        client.

    Raises:
        RunStateError: An update's or a round's influence file is corrupt.
    """
    entries = []
    for round_ in rounds:
        influence = run_dir.load_influence(round_)
        for u in run_dir.updates(round_):
            entry = {"round": u.round, "client_id": u.client_id, "num_examples": u.num_examples, "metrics": u.metrics, "resources": u.resources}
            factors = _factors_of(influence, u.client_id)
            if factors is not None:
                entry |= {"weight": factors.weight, "clip_scale": factors.scale, "keys_clipped_harder": len(factors.key_scales)}
            entries.append(entry)
    return entries


def _factors_of(influence: RoundInfluence | None, client_id: str) -> ClientInfluence | None:
    """The factors ``client_id``'s update was aggregated with (None: not aggregated, or not recorded)."""
    if influence is None:
        return None
    try:
        return influence.client(client_id)
    except KeyError:
        return None


def write_report(
    run_dir: RunDir,
    state: RoundState,
    *,
    method: str,
    aggregation: str,
    aggregation_settings: Mapping[str, Any],
    task: Mapping[str, Any],
    assignments: Mapping[str, Any],
    tiers: Mapping[str, Any],
    totals: ServingTotals,
    results: Mapping[str, Any],
) -> Path:
    """Write ``report.json``: rounds, clients, every persisted update, tiers, traffic, results.

    Args:
        run_dir: The run directory.
        state: The round machine's state at the end.
        method: The run's method.
        aggregation: The aggregation strategy's name.
        aggregation_settings: The ``[aggregation]`` section in force (strategy options and
            influence bounds), so an audit can recompute every aggregate.
        task: The run's task (:class:`shared.tasks.TaskSpec` as plain types).
        assignments: Client id -> its assignment (accepted, tier, reason, plan).
        tiers: Tier name -> its description (layers, version, package bytes).
        totals: What the server counted.
        results: Export and evaluation results ({} when the run failed).

    Returns:
        The file written.
    """
    report = {
        "run_id": state.run_id,
        "phase": state.phase.value,
        "fail_reason": state.fail_reason,
        "method": method,
        "aggregation": aggregation,
        "aggregation_settings": dict(aggregation_settings),
        "task": dict(task),
        "rounds": [round_record_dict(rec) for rec in state.records],
        "assignments": dict(assignments),
        "clients": {c.client_id: {"tier": c.tier, "accepted": c.accepted, "examples": c.num_examples} for c in state.clients},
        "updates": update_entries(run_dir, [rec.round for rec in state.records]),
        "tiers": dict(tiers),
        "chunks_served": totals.chunks_served,
        "bytes_served": totals.bytes_served,
        "refused": dict(totals.refused),
        "ignored": dict(totals.ignored),
        "coordinator_bytes_sent": totals.bytes_sent,
        "coordinator_bytes_received": totals.bytes_received,
        "results": dict(results),
        "round_evaluations": run_dir.round_evaluations(),
    }
    path = run_dir.path / REPORT_FILE
    path.write_text(json.dumps(report, indent=2, default=str))
    return path


def load_report(run_dir: str | Path) -> dict[str, Any]:
    """Read a run directory's report (and the simulated clients' outcomes, if any).

    Args:
        run_dir: A run directory.

    Returns:
        The report dict with ``per_client_round`` rows added.

    Raises:
        RunStateError: No ``report.json`` (the run has not ended yet, or it is not a run directory).
    """
    run_dir = Path(run_dir)
    path = run_dir / REPORT_FILE
    if not path.is_file():
        raise RunStateError(f"{path} does not exist: the run has not ended, or {run_dir} is not a run directory")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunStateError(f"{path} is not valid JSON ({exc.msg})") from exc
    clients_path = run_dir / "clients.json"
    if clients_path.is_file():
        data["client_outcomes"] = json.loads(clients_path.read_text())
    data["per_client_round"] = per_client_rounds(data)
    return data


def per_client_rounds(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per accepted update: round, client, loss, memory, time, bytes this round.

    Args:
        data: A loaded report.

    Returns:
        Rows sorted by client then round; ``bytes_up``/``bytes_down`` are this round's traffic.
    """
    rows = []
    last: dict[str, tuple[int, int]] = {}
    for update in sorted(data.get("updates", []), key=lambda u: (u["client_id"], u["round"])):
        res, metrics = update.get("resources", {}), update.get("metrics", {})
        sent, received = int(res.get("bytes_sent", 0)), int(res.get("bytes_received", 0))
        prev_sent, prev_received = last.get(update["client_id"], (0, 0))
        last[update["client_id"]] = (sent, received)
        rows.append({
            "round": update["round"],
            "client_id": update["client_id"],
            "examples": update["num_examples"],
            "loss_first": metrics.get("loss_first"),
            "loss_last": metrics.get("loss_last"),
            "peak_rss_bytes": res.get("peak_rss_bytes", 0),
            "peak_gpu_bytes": res.get("peak_gpu_bytes", 0),
            "wall_seconds": res.get("wall_seconds", 0.0),
            "cpu_seconds": res.get("cpu_seconds", 0.0),
            "bytes_up": sent - prev_sent,
            "bytes_down": received - prev_received,
            "device_class": res.get("device_class", ""),
        })
    return rows


def refused_rows(data: dict[str, Any]) -> list[tuple[str, int]]:
    """The coordinator's refused inbound messages, most frequent reason first.

    Args:
        data: A loaded report.

    Returns:
        ``(reason, count)`` pairs: an error class (``MalformedMessageError``, ``TopicError``
        ...) or a rejection code (``nan``, ``not_assigned`` ...), then a ``total`` row; empty
        when nothing was refused.
    """
    counts = data.get("refused") or {}
    rows = sorted(((str(k), int(v)) for k, v in counts.items()), key=lambda kv: (-kv[1], kv[0]))
    return [*rows, ("total", sum(v for _, v in rows))] if rows else []


def render_summary(data: dict[str, Any]) -> None:
    """Print the run's rounds, clients and results as rich tables on the console.

    Args:
        data: A loaded report.
    """
    from rich import box
    from rich.table import Table

    from shared.console import console

    rounds = Table(title=f"run {data['run_id']} ({data.get('method', '?')}): {data['phase']}", box=box.SIMPLE_HEAD)
    for col in ("round", "reported", "dropped", "rejected", "late", "dup", "examples", "seconds", "outcome"):
        rounds.add_column(col, justify="left" if col == "outcome" else "right")
    for rec in data["rounds"]:
        seconds = (rec["closed_at"] - rec["started_at"]) if rec.get("closed_at") else None
        rounds.add_row(
            str(rec["round"]), f"{len(rec['reported'])}/{len(rec['participants'])}", str(rec["dropouts"]),
            str(rec["rejected"]), str(rec["late"]), str(rec["duplicates"]), str(rec["examples"]),
            f"{seconds:.0f}" if seconds is not None else "-", rec["outcome"],
        )
    console.print(rounds)

    clients = Table(title="clients (traffic counted at the MQTT layer)", box=box.SIMPLE_HEAD)
    for col in ("client", "tier", "rounds", "MiB down", "MiB up", "peak GiB", "budget", "train s", "loss"):
        clients.add_column(col, justify="left" if col in ("client", "tier") else "right")
    assignments = data.get("assignments", {})
    outcomes = {c.get("client_id", str(i)): c for i, c in enumerate(data.get("client_outcomes", []))}
    for client_id, info in sorted(data.get("clients", {}).items()):
        rows = [r for r in data["per_client_round"] if r["client_id"] == client_id]
        final = outcomes.get(client_id, {})
        down = final.get("bytes_received", sum(r["bytes_down"] for r in rows))
        up = final.get("bytes_sent", sum(r["bytes_up"] for r in rows))
        budget = assignments.get(client_id, {}).get("budget_bytes")
        losses = f"{rows[0]['loss_first']:.2f}>{rows[-1]['loss_last']:.2f}" if rows and rows[0]["loss_first"] is not None else "-"
        clients.add_row(
            client_id, info.get("tier") or "refused", str(len(rows)),
            f"{down / MIB:.1f}", f"{up / MIB:.2f}",
            f"{max((r['peak_rss_bytes'] for r in rows), default=0) / GIB:.2f}",
            f"{budget / GIB:.1f}" if budget else "-",
            f"{sum(r['wall_seconds'] for r in rows):.0f}", losses,
        )
    console.print(clients)
    from coordinator.run.tier_report import (
        render_tiers,  # it reads this module's helpers
    )

    render_tiers(data)

    refused = refused_rows(data)
    if refused:
        table = Table(title="refused inbound messages", box=box.SIMPLE_HEAD)
        table.add_column("reason")
        table.add_column("count", justify="right")
        for reason, count in refused:
            table.add_row(reason, str(count))
        console.print(table)

    results = data.get("results") or {}
    if results:
        table = Table(title="results", show_header=False, box=box.SIMPLE)
        table.add_row("adapter", str(results.get("adapter_dir", "-")))
        evaluation = results.get("evaluation")
        if evaluation:
            table.add_row("task", f"{evaluation['task']} ({evaluation['kind']}), {evaluation['test_examples']} test examples")
            for label, key in (("full LLM before", "before"), ("full LLM + adapter", "after")):
                table.add_row(label, metric_text(evaluation[key]))
            table.add_row("after - before (paired)", metric_text(evaluation["difference"], signed=True))
            for name, score in evaluation.get("tiers", {}).items():
                table.add_row(f"tier {name} + adapter", metric_text(score))
        for name, tier in data.get("tiers", {}).items():
            table.add_row(f"tier {name}", f"{tier['layers']} layers, package {tier['package_bytes'] / MIB:.1f} MiB, v{tier['version']}")
        privacy = results.get("privacy")
        if privacy:
            table.add_row(
                "privacy (DP-FedAvg)",
                f"epsilon {privacy['epsilon_aggregate']:.3g} against the published adapters, "
                f"{privacy['epsilon_coordinator']:.3g} against the coordinator (delta {privacy['delta']:g}, "
                f"{privacy['rounds']} rounds, clip {privacy['clip_norm']:g}, z {privacy['noise_multiplier']:g})",
            )
        console.print(table)
    curve = data.get("round_evaluations") or []
    if curve:
        table = Table(title="global adapter on the test set, by round (full LLM)", box=box.SIMPLE_HEAD)
        for col in ("round", "metric", "examples"):
            table.add_column(col, justify="right")
        for row in curve:
            table.add_row(str(row["round"]), metric_text(row), str(row["n"]))
        console.print(table)


def metric_text(value: Mapping[str, Any], *, signed: bool = False) -> str:
    """``accuracy 0.765 [0.702, 0.819]`` from a metric with its interval (``+0.005 [...]`` if signed)."""
    def number(v: float) -> str:
        return f"{v:+.3f}" if signed else f"{v:.3f}"

    return f"{value['name']} {number(value['value'])} [{number(value['low'])}, {number(value['high'])}]"


CSV_FIELDS = ("round", "client_id", "examples", "loss_first", "loss_last", "peak_rss_bytes", "peak_gpu_bytes",
              "wall_seconds", "cpu_seconds", "bytes_up", "bytes_down", "device_class")


def write_csv(data: dict[str, Any], path: str | Path) -> Path:
    """Write the per-round, per-client rows as CSV.

    Args:
        data: A loaded report.
        path: Output file.

    Returns:
        The path written.
    """
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(data["per_client_round"])
    return path


def write_plots(data: dict[str, Any], folder: str | Path) -> list[Path]:
    """PNG plots: loss and accuracy per round, bytes per round, memory per client vs budget.

    Args:
        data: A loaded report.
        folder: Output folder (created).

    Returns:
        The files written.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = data["per_client_round"]
    rounds = sorted({r["round"] for r in rows})
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    mean_loss = [_mean([r["loss_last"] for r in rows if r["round"] == n and r["loss_last"] is not None]) for n in rounds]
    ax.plot(rounds, mean_loss, marker="o", label="mean client loss (end of round)")
    ax.set_xlabel("round")
    ax.set_ylabel("training loss")
    evaluation = (data.get("results") or {}).get("evaluation")
    curve = data.get("round_evaluations") or []
    if evaluation or curve:
        metric = ax.twinx()
        if curve:
            # The per-round curve, with its confidence band: the global adapter on the full LLM.
            xs = [r["round"] for r in curve]
            metric.plot(xs, [r["value"] for r in curve], color="green", marker="s", label="full LLM + global adapter")
            metric.fill_between(xs, [r["low"] for r in curve], [r["high"] for r in curve], color="green", alpha=0.15)
        if evaluation:
            metric.axhline(evaluation["before"]["value"], color="grey", linestyle="--", label="full LLM before")
            metric.axhline(evaluation["after"]["value"], color="green", linestyle=":", label="full LLM + final adapter")
        name = evaluation["metric"] if evaluation else curve[0]["name"]
        metric.set_ylabel(f"test {name}")
        metric.set_ylim(0, 1)
        metric.legend(loc="lower right")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.legend(loc="upper right")
    ax.set_title("loss and test metric per round")
    written.append(_save(fig, folder / "loss_accuracy.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    down = [sum(r["bytes_down"] for r in rows if r["round"] == n) / MIB for n in rounds]
    up = [sum(r["bytes_up"] for r in rows if r["round"] == n) / MIB for n in rounds]
    ax.bar([n - 0.2 for n in rounds], down, width=0.4, label="down (sub-LLM, adapter, schedule)")
    ax.bar([n + 0.2 for n in rounds], up, width=0.4, label="up (deltas, reports)")
    ax.set_xlabel("round")
    ax.set_ylabel("MiB, all clients")
    ax.set_title("traffic per round (MQTT layer)")
    ax.legend()
    written.append(_save(fig, folder / "bytes_per_round.png"))

    fig, ax = plt.subplots(figsize=(6, 4))
    assignments = data.get("assignments", {})
    clients = sorted({r["client_id"] for r in rows})
    peaks = [max(r["peak_rss_bytes"] for r in rows if r["client_id"] == c) / GIB for c in clients]
    budgets = [(assignments.get(c, {}).get("budget_bytes") or 0) / GIB for c in clients]
    estimates = [(assignments.get(c, {}).get("estimate_bytes") or 0) / GIB for c in clients]
    # One colour per tier package, so a mixed fleet shows which tier each device trained.
    packages = [assignments.get(c, {}).get("tier") or "?" for c in clients]
    palette = plt.get_cmap("tab10")
    colours = {name: palette(i % 10) for i, name in enumerate(sorted(set(packages)))}
    for name in sorted(colours):
        mine = [i for i, p in enumerate(packages) if p == name]
        ax.bar([clients[i] for i in mine], [peaks[i] for i in mine], color=colours[name], label=f"peak RSS, {name}")
    ax.scatter(clients, estimates, color="black", marker="x", label="plan estimate")
    ax.scatter(clients, budgets, color="red", marker="_", s=400, label="budget")
    ax.set_ylabel("GiB")
    ax.set_title("memory per client against its budget, by tier")
    ax.tick_params(axis="x", labelrotation=30)
    ax.legend(fontsize="small")
    written.append(_save(fig, folder / "memory_per_client.png"))
    return written


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
