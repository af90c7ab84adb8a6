"""The paper's claims, measured: FedSODA against FedOT and FedPETuning on real data.

Every run is a real ``simulate``: the embedded MQTT broker, the coordinator in this process
(the ``serve`` code path) and one ``fedsoda-client join`` process per client. The three
methods share everything but the method: the clients, their data split, the rounds,
local steps, LoRA rank and learning rate (the ``make demo`` preset, ``coordinator.settings.PRESETS['demo']``).
Per method and task, over several seeds (the seed changes the client split, data order
and LoRA initialisation):

- communication: bytes one client sent plus received over the whole run, counted by its
  MQTT transport (sub-LLM chunks, schedules, global adapters down; deltas and reports up);
- client storage: the bytes of the model package the client must hold (its tier);
- accuracy of the full LLM with the final adapter (PEFT) on the task's test split, and of
  the full LLM alone (zero-shot, the same for every method);
- round time: from a round's start to its aggregation, on this machine.

Writes ``benchmarks/results/paper.json`` (every run, then the summary), ``paper.md`` and
``paper.png``. A run already in ``paper.json`` with the same settings is reused, so an
interrupted benchmark resumes where it stopped (``--fresh`` reruns everything).

FedKRSO (``--methods fedsoda,fedpetuning,fedkrso``) runs on the same preset: the same clients,
split, rounds, steps, target modules and learning rate, with the ``[subspace]`` defaults (rank,
seeds per round). Each run also records bytes down and up separately and the clients' peak RSS.

Usage: ``python benchmarks/paper.py [--tasks rotten_tomatoes,imdb] [--seeds 0,1,2]
[--methods fedsoda,fedot,fedpetuning] [--clients 3] [--quick] [--fresh]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from coordinator.run.reports import load_report  # noqa: E402
from coordinator.settings import (
    RunConfig,  # noqa: E402
    preset,  # noqa: E402
)
from coordinator.simulate import SimulationOptions, simulate  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.errors import ConfigError  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MiB = 1024 * 1024
METHOD_NAMES = ("fedsoda", "fedot", "fedpetuning", "fedkrso")
"""Every method the tables know, in their order."""
DEFAULT_METHODS = ("fedsoda", "fedot", "fedpetuning")
"""The paper's three, run unless ``--methods`` says otherwise."""
DISPLAY = {"fedsoda": "FedSODA", "fedot": "FedOT", "fedpetuning": "FedPETuning", "fedkrso": "FedKRSO"}

#: Per task: what differs from the demo preset. IMDB reviews are long: clients train on and the
#: evaluation scores the last 96 tokens of each (the end of a review carries its verdict). The
#: task-format calibration text always comes from the other corpus, never the clients'.
TASK_OVERRIDES: dict[str, dict[str, Any]] = {
    "rotten_tomatoes": {"task.preset": "rotten_tomatoes"},
    "imdb": {"task.preset": "imdb", "training.seq_len": 96, "evaluation.max_length": 96,
             "model.task_calibration": "rotten_tomatoes"},
}

#: The paper's headline targets on this setup (ISSUE 6).
TARGETS = {
    "communication_reduction_vs_fedpetuning": 0.70,
    "storage_reduction_vs_fp16_full": 0.75,
    "accuracy_gain_vs_fedot_points": 3.0,
    "accuracy_gap_vs_fedpetuning_points": -1.0,
}


def run_settings(
    task: str, method: str, seed: int, clients: int, quick: bool, model: str, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The config overrides of one run: the demo preset, the task, the method, the seed, then ``extra``."""
    overrides = preset("demo")
    overrides.update(TASK_OVERRIDES[task])
    overrides.update({"run_id": f"paper-{task}-{method}-{seed}", "method": method, "seed": seed,
                      "training.seed": seed, "model.model": model, "rounds.min_clients": clients})
    if quick:  # the smoke test: a 2-round sketch on a small model that exercises every path
        overrides.update({"rounds.rounds": 2, "training.local_steps": 2, "alignment.pre_align_steps": 2,
                          "alignment.realign_steps": 1, "rounds.realign_every": 1, "evaluation.test_samples": 16,
                          "model.calibration_samples": 8, "pruning.depths": [4], "pruning.block_size": 1})
    overrides.update(extra or {})
    return overrides


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: the value as JSON (numbers, booleans, lists), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. rounds.realign_every=0), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def one_run(
    overrides: dict[str, Any], clients: int, examples_per_client: int, workdir: Path, **simulation: Any
) -> dict[str, Any]:
    """Run one ``simulate`` and read back what the benchmark reports (``simulation``: more
    :class:`SimulationOptions`, e.g. ``partition="dirichlet"``)."""
    config = load_config(RunConfig, None, overrides=overrides)
    run_dir = workdir / config.run_id
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.monotonic()
    options = SimulationOptions(clients=clients, examples_per_client=examples_per_client, **simulation)
    outcome, _clients = simulate(config, options, run_dir)
    wall = time.monotonic() - started
    if outcome.status != "finished":
        raise RuntimeError(f"run {config.run_id} ended {outcome.status}: {outcome.reason} (see {run_dir})")
    return read_run(run_dir, overrides, wall)


def read_run(run_dir: Path, overrides: dict[str, Any], wall: float | None) -> dict[str, Any]:
    """What the benchmark reports of one finished run directory (``wall``: its seconds, if timed)."""
    data = load_report(run_dir)
    tier_of = {c: info.get("tier") for c, info in data["clients"].items()}
    package = {name: tier["package_bytes"] for name, tier in data["tiers"].items()}
    per_client = [
        {
            "client_id": c["client_id"],
            "bytes_down": c["bytes_received"],
            "bytes_up": c["bytes_sent"],
            "storage_bytes": package[tier_of[c["client_id"]]],
        }
        for c in data["client_outcomes"]
    ]
    rounds = [r for r in data["rounds"] if r.get("outcome") == "aggregated"]
    evaluation = data["results"]["evaluation"]
    peak_rss = [u["resources"]["peak_rss_bytes"] for u in data["updates"]]
    return {
        "overrides": overrides,
        "clients": per_client,
        "bytes_per_client": statistics.mean(c["bytes_down"] + c["bytes_up"] for c in per_client),
        "bytes_down_per_client": statistics.mean(c["bytes_down"] for c in per_client),
        "bytes_up_per_client": statistics.mean(c["bytes_up"] for c in per_client),
        "client_peak_rss_bytes": max(peak_rss) if peak_rss else None,
        "storage_bytes": statistics.mean(c["storage_bytes"] for c in per_client),
        "layers": [t["layers"] for t in data["tiers"].values()],
        "accuracy_before": evaluation["before"]["value"],
        "accuracy_after": evaluation["after"]["value"],
        "test_examples": evaluation["test_examples"],
        "round_seconds": statistics.mean(r["closed_at"] - r["started_at"] for r in rounds),
        "run_seconds": wall,
        "loss_first": data["per_client_round"][0]["loss_first"] if data["per_client_round"] else None,
    }


def full_model_fp16_bytes(model: str) -> int:
    """Bytes of the full model's parameters in fp16 (2 bytes each), counted on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from coordinator.model.models import bundled_model_path

    config = AutoConfig.from_pretrained(bundled_model_path() if model == "bundled" else model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return 2 * sum(p.numel() for p in model.parameters())


def summarize(runs: list[dict[str, Any]], fp16_bytes: int) -> dict[str, Any]:
    """Mean and spread per (task, method), and the headline comparisons against the targets."""
    summary: dict[str, Any] = {}
    for task in sorted({r["task"] for r in runs}):
        rows: dict[str, Any] = {}
        for method in METHOD_NAMES:
            mine = [r for r in runs if r["task"] == task and r["method"] == method]
            if not mine:
                continue
            acc = [r["accuracy_after"] for r in mine]
            rows[method] = {
                "seeds": [r["seed"] for r in mine],
                "accuracy_mean": statistics.mean(acc),
                "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                "accuracy_min": min(acc),
                "accuracy_max": max(acc),
                "accuracy_before": statistics.mean(r["accuracy_before"] for r in mine),
                "bytes_per_client": statistics.mean(r["bytes_per_client"] for r in mine),
                "storage_bytes": statistics.mean(r["storage_bytes"] for r in mine),
                "layers": mine[0]["layers"],
                "round_seconds": statistics.mean(r["round_seconds"] for r in mine),
                # Runs of earlier versions of this benchmark did not record these: None then.
                **{key: statistics.mean(r[key] for r in mine) if all(r.get(key) is not None for r in mine) else None
                   for key in ("bytes_down_per_client", "bytes_up_per_client", "client_peak_rss_bytes")},
            }
        headline: dict[str, Any] = {}
        soda, pet, ot = rows.get("fedsoda"), rows.get("fedpetuning"), rows.get("fedot")
        if soda:
            headline["storage_reduction_vs_fp16_full"] = 1 - soda["storage_bytes"] / fp16_bytes
        if soda and pet:
            headline["communication_reduction_vs_fedpetuning"] = 1 - soda["bytes_per_client"] / pet["bytes_per_client"]
            headline["accuracy_gap_vs_fedpetuning_points"] = 100 * (soda["accuracy_mean"] - pet["accuracy_mean"])
        if soda and ot:
            headline["accuracy_gain_vs_fedot_points"] = 100 * (soda["accuracy_mean"] - ot["accuracy_mean"])
        headline_met = {k: v >= TARGETS[k] for k, v in headline.items()}
        summary[task] = {"methods": rows, "headline": headline, "met": headline_met}
    return summary


def write_markdown(summary: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """The README table: one row per (task, method), then the headline figures against the targets."""
    lines = [
        f"# {' vs '.join(DISPLAY[m] for m in METHOD_NAMES if any(m in block['methods'] for block in summary.values()))} "
        "(benchmarks/paper.py)",
        "",
        f"{meta['model']}, {meta['clients']} clients x {meta['examples_per_client']} examples (IID), "
        f"{meta['rounds']} rounds x {meta['local_steps']} local steps, LoRA r={meta['lora_rank']}, "
        f"{meta['test_examples']} test examples per task; {meta['machine']}. Accuracy: the full LLM + the final "
        "adapter; `before` is the full LLM alone."
        + ("".join(f" Ablation: `{key} = {json.dumps(value)}`." for key, value in meta.get("settings", {}).items())),
        "",
        "| task | method | client layers | accuracy (mean ± sd, min-max) | before | MiB per client (down+up) "
        "| MiB down / up | client storage MiB | client peak RSS MiB | round s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task, block in summary.items():
        for method, row in block["methods"].items():
            lines.append(
                f"| {task} | {method} | {'/'.join(map(str, row['layers']))} | "
                f"{row['accuracy_mean']:.3f} ± {row['accuracy_std']:.3f} ({row['accuracy_min']:.3f}-{row['accuracy_max']:.3f}, "
                f"{len(row['seeds'])} seed{'s' if len(row['seeds']) != 1 else ''}) | "
                f"{row['accuracy_before']:.3f} | {row['bytes_per_client'] / MiB:.1f} | {_down_up(row)} | "
                f"{row['storage_bytes'] / MiB:.1f} | {_mib(row.get('client_peak_rss_bytes'))} | {row['round_seconds']:.0f} |"
            )
    lines += ["", f"Full model in fp16: {meta['fp16_full_bytes'] / MiB:.1f} MiB.", "",
              "| task | headline | measured | target | met |", "| --- | --- | --- | --- | --- |"]
    for task, block in summary.items():
        for key, value in block["headline"].items():
            shown = f"{value:+.1f} pts" if key.endswith("points") else f"{100 * value:.1f}%"
            target = f"{TARGETS[key]:+.1f} pts" if key.endswith("points") else f">= {100 * TARGETS[key]:.0f}%"
            lines.append(f"| {task} | {key.replace('_', ' ')} | {shown} | {target} | {'yes' if block['met'][key] else 'NO'} |")
    path.write_text("\n".join(lines) + "\n")


def _mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MiB:.1f}"


def _down_up(row: dict[str, Any]) -> str:
    down, up = row.get("bytes_down_per_client"), row.get("bytes_up_per_client")
    return "n/a" if down is None or up is None else f"{down / MiB:.1f} / {up / MiB:.2f}"


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Three panels per task row: accuracy (error bars = sd over seeds), MiB per client, client storage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 3, figsize=(12, 3.4 * len(tasks)), squeeze=False)
    for row_axes, task in zip(axes, tasks):
        rows = summary[task]["methods"]
        names = list(rows)
        acc_ax, bytes_ax, store_ax = row_axes
        acc_ax.bar(names, [rows[n]["accuracy_mean"] for n in names], yerr=[rows[n]["accuracy_std"] for n in names], capsize=4)
        acc_ax.axhline(statistics.mean(rows[n]["accuracy_before"] for n in names), color="grey", linestyle="--", label="full LLM alone")
        acc_ax.set_ylim(0.4, 1.0)
        acc_ax.set_title(f"{task}: full LLM + adapter accuracy")
        acc_ax.legend(loc="lower right", fontsize=8)
        bytes_ax.bar(names, [rows[n]["bytes_per_client"] / MiB for n in names])
        bytes_ax.set_title("MiB per client (MQTT, down + up)")
        store_ax.bar(names, [rows[n]["storage_bytes"] / MiB for n in names])
        store_ax.set_title("client model storage (MiB)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="rotten_tomatoes,imdb")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"any of {', '.join(METHOD_NAMES)}")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--examples-per-client", type=int, default=200)
    parser.add_argument("--model", default="bundled", help="full model: 'bundled' (SmolLM2-135M) or a Hugging Face folder")
    parser.add_argument("--quick", action="store_true", help="2 rounds x 2 steps, 16 test examples, 2 layers pruned: a smoke run")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already in the results file")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rewrite the markdown table and plot from the runs in the results file")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--work-dir", type=Path, default=None, help="keep the run directories here (default: a temp dir)")
    parser.add_argument("--set", type=parse_setting, action="append", default=[], metavar="KEY=VALUE", dest="settings",
                        help="a config override on top of the preset for every run, e.g. rounds.realign_every=0 "
                             "(an ablation: give it its own --out-dir)")
    args = parser.parse_args(argv)
    extra = dict(args.settings)
    try:
        load_config(RunConfig, None, overrides=extra)
    except ConfigError as exc:
        parser.error(f"--set: {exc}")

    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASK_OVERRIDES))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {sorted(TASK_OVERRIDES)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    methods = [s for s in args.methods.split(",") if s]
    if set(methods) - set(METHOD_NAMES):
        parser.error(f"unknown method(s) {sorted(set(methods) - set(METHOD_NAMES))}; choose from {', '.join(METHOD_NAMES)}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.out_dir / "paper.json"
    previous = [] if args.fresh or not results_path.is_file() else json.loads(results_path.read_text()).get("runs", [])
    workdir = args.work_dir or Path(tempfile.mkdtemp(prefix="fedsoda-paper-"))
    runs: list[dict[str, Any]] = []
    fp16_bytes = full_model_fp16_bytes(args.model)
    meta: dict[str, Any] = {}

    def save() -> dict[str, Any]:
        # Runs of the file that this invocation has not reached (yet, or at all) stay in it.
        kept = runs + [p for p in previous if all(p["overrides"] != r["overrides"] for r in runs)]
        summary = summarize(runs, fp16_bytes)
        results_path.write_text(json.dumps({"meta": meta, "runs": kept, "summary": summary}, indent=2))
        return summary

    if args.report_only:  # e.g. after an interrupted benchmark: report exactly what finished
        saved = json.loads(results_path.read_text())
        runs, meta = saved["runs"], saved["meta"]
        meta["seeds"] = {task: sorted({r["seed"] for r in runs if r["task"] == task}) for task in sorted({r["task"] for r in runs})}
        seeds = []
    # Seeds outermost: an interrupted benchmark still has every method on the same seeds.
    for seed in seeds:
        for task in tasks:
            for method in methods:
                overrides = run_settings(task, method, seed, args.clients, args.quick, args.model, extra)
                label = f"{task}/{method}/seed {seed}"
                done = next((r for r in previous if r["overrides"] == overrides), None)
                if done is None:
                    print(f"{time.strftime('%H:%M:%S')} running {label}", flush=True)
                    done = one_run(overrides, args.clients, args.examples_per_client, workdir)
                    done.update({"task": task, "method": method, "seed": seed})
                else:
                    print(f"{time.strftime('%H:%M:%S')} reusing {label}", flush=True)
                runs.append(done)
                print(f"  accuracy {done['accuracy_before']:.3f} -> {done['accuracy_after']:.3f}, "
                      f"{done['bytes_per_client'] / MiB:.1f} MiB per client, round {done['round_seconds']:.0f} s", flush=True)
                config = load_config(RunConfig, None, overrides=overrides)
                meta = {
                    "clients": args.clients, "examples_per_client": args.examples_per_client, "seeds": seeds,
                    "rounds": config.rounds.rounds, "local_steps": config.training.local_steps,
                    "lora_rank": config.training.lora_rank, "test_examples": done["test_examples"],
                    "fp16_full_bytes": fp16_bytes, "quick": args.quick, "settings": extra,
                    "model": "SmolLM2-135M-Instruct (30 layers)" if args.model == "bundled" else args.model,
                    "machine": f"{platform.machine()} CPU, {platform.python_version()}",
                }
                save()
    summary = save()
    write_markdown(summary, meta, args.out_dir / "paper.md")
    write_plot(summary, args.out_dir / "paper.png")
    print((args.out_dir / "paper.md").read_text())
    if args.work_dir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return summary


if __name__ == "__main__":
    main()
