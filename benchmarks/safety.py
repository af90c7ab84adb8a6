"""The cost of safety: the demo with the bounded aggregator on and off, with DP-FedAvg, and what signing costs.

Three measurements, each side by side in one run:

- **The influence bounds** (``[aggregation]`` weight cap, clipping overall and per key): the
  ``make demo`` preset (FedSODA, Rotten Tomatoes, 3 clients) on several seeds, once with the
  defaults and once with ``weight_cap = clip = inf, clip_per_key = false`` (plain FedAvg), the
  two runs of a seed one after the other. Reported: accuracy of the full model with the final
  adapter per setting, the seed-paired difference with a t confidence interval, bytes per
  client, and how many updates the bounds clipped in the honest runs.
- **DP-FedAvg** (``[privacy]``): the same runs with clients clipping their deltas to 0.5 and
  adding Gaussian noise of multiplier 1, and the privacy budget each run reports.
- **Signing** (every coordinator message is Ed25519-signed and clients verify it): the wire
  bytes a signature adds to each message, and encode+decode time of real message shapes (a
  1 MiB chunk, a global adapter of the demo's size, a schedule) signed-and-verified against
  unsigned, interleaved, as a ratio.

Writes ``benchmarks/results/safety/safety.json`` (every run; an interrupted benchmark resumes
with the runs it has), ``safety.md`` and ``safety.png``.

Usage: ``python benchmarks/safety.py [--seeds 0,1,2] [--clients 3] [--settings on,off,dp]
[--partition dirichlet --dirichlet-alpha 0.5 --out-dir benchmarks/results/safety-dirichlet] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.paper import MiB, one_run, run_settings  # noqa: E402
from coordinator.run.reports import load_report  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "safety"
SETTINGS = {
    "on": {},
    "off": {"aggregation.weight_cap": math.inf, "aggregation.clip": math.inf, "aggregation.clip_per_key": False},
    "dp": {"privacy.enabled": True, "privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0},
}
"""The aggregations compared: the defaults, the bounds switched off (plain FedAvg), and
DP-FedAvg (clip 0.5, about the norm of an honest demo delta, and noise multiplier 1)."""
TITLES = {"on": "bounded (defaults)", "off": "plain FedAvg", "dp": "DP-FedAvg (C 0.5, z 1)"}

# Two-sided 95% t quantiles by degrees of freedom (small samples; 1.96 beyond the table).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval of ``values`` (the interval is the mean alone for one value)."""
    m = statistics.mean(values)
    if len(values) < 2:
        return m, m, m
    half = _T95.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return m, m - half, m + half


def clipped_updates(run_dir: Path) -> dict[str, int]:
    """How many updates of a finished run the bounds touched (weight capped, clipped overall, per key)."""
    from coordinator.run.checkpoint import RunDir

    run = RunDir(run_dir)
    counts = {"updates": 0, "weight_capped": 0, "clipped": 0, "clipped_per_key": 0}
    for path in sorted((run_dir / "influence").glob("round_*.json")):
        influence = run.load_influence(int(path.stem.split("_")[1]))
        assert influence is not None
        for c in influence.clients:
            counts["updates"] += 1
            counts["weight_capped"] += c.weight < c.claimed_weight
            counts["clipped"] += c.scale < 1.0
            counts["clipped_per_key"] += bool(c.key_scales)
    return counts


def signing_cost(repeats: int) -> dict[str, Any]:
    """Bytes and encode+decode time of real message shapes, signed-and-verified vs unsigned."""
    import torch

    from shared import codec
    from shared.protocol import Chunk, GlobalAdapter, MessageType
    from shared.signing import SigningKey
    from shared.tensors import state_to_payloads

    key = SigningKey.generate()
    # The demo's global adapter: rank 8 LoRA on q_proj and v_proj of 30 layers of width 576.
    adapter = {f"layers.{i}.{m}.lora_{ab}": torch.randn((8, 576) if ab == "A" else (576 if m == "q_proj" else 192, 8))
                for i in range(30) for m in ("q_proj", "v_proj") for ab in "AB"}
    shapes = {
        "chunk (1 MiB)": (MessageType.CHUNK, Chunk(blob_id="b" * 64, hash="h" * 64, data=bytes(MiB))),
        "global adapter": (MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=3, tensors=state_to_payloads(adapter))),
    }
    rows = {}
    for name, (msg_type, body) in shapes.items():
        plain = codec.encode(msg_type, body, run="r", round=1, sender="coordinator")
        signed = codec.encode(msg_type, body, run="r", round=1, sender="coordinator", signer=key)
        times = {"unsigned": [], "signed": []}
        for _ in range(repeats):  # interleaved, so drift hits both alike
            for label in ("unsigned", "signed"):
                started = time.perf_counter()
                data = codec.encode(msg_type, body, run="r", round=1, sender="coordinator", signer=key if label == "signed" else None)
                codec.decode(data, verify_key=key.public if label == "signed" else None)
                times[label].append(time.perf_counter() - started)
        rows[name] = {
            "bytes_unsigned": len(plain),
            "bytes_signed": len(signed),
            "extra_bytes": len(signed) - len(plain),
            "seconds_unsigned": statistics.median(times["unsigned"]),
            "seconds_signed": statistics.median(times["signed"]),
            "time_ratio": statistics.median(times["signed"]) / statistics.median(times["unsigned"]),
            "signed_mib_per_s": len(signed) / MiB / statistics.median(times["signed"]),
        }
    return rows


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per setting: accuracy mean and interval, bytes; and the seed-paired difference on - off."""
    out: dict[str, Any] = {}
    for label in SETTINGS:
        mine = [r for r in runs if r["setting"] == label]
        if mine:
            acc = [r["accuracy_after"] for r in mine]
            out[label] = {
                "seeds": [r["seed"] for r in mine],
                "accuracy": mean_ci(acc),
                "accuracy_before": statistics.mean(r["accuracy_before"] for r in mine),
                "bytes_per_client": statistics.mean(r["bytes_per_client"] for r in mine),
                "clipped": {k: sum(r["clipped"][k] for r in mine) for k in mine[0]["clipped"]},
            }
    by = {(r["setting"], r["seed"]): r for r in runs}
    for label, key in (("on", "paired"), ("dp", "paired_dp")):
        paired = sorted({r["seed"] for r in runs if r["setting"] == label} & {r["seed"] for r in runs if r["setting"] == "off"})
        if paired:
            diffs = [by[label, s]["accuracy_after"] - by["off", s]["accuracy_after"] for s in paired]
            out[key] = {
                "seeds": paired, "differences": diffs, "difference": mean_ci(diffs),
                "bytes_ratio": statistics.mean(by[label, s]["bytes_per_client"] / by["off", s]["bytes_per_client"] for s in paired),
            }
    private = [r["privacy"] for r in runs if r["setting"] == "dp" and r.get("privacy")]
    if private:
        out["dp"]["epsilon_aggregate"] = max(p["epsilon_aggregate"] for p in private)
        out["dp"]["epsilon_coordinator"] = max(p["epsilon_coordinator"] for p in private)
        out["dp"]["delta"] = private[0]["delta"]
    return out


def write_markdown(summary: dict[str, Any], signing: dict[str, Any], meta: dict[str, Any], path: Path) -> None:
    """The tables: accuracy and bytes on vs off, and the signing cost per message shape."""
    lines = [
        "# The cost of safety",
        "",
        f"`make demo` preset (FedSODA, Rotten Tomatoes, {meta['clients']} clients, {meta['rounds']} rounds, "
        f"{meta['test_examples']} test examples, {meta.get('partition', 'iid')} split), seeds {meta['seeds']}; {meta['machine']}.",
        "",
        "## Influence bounds on vs off",
        "",
        "| aggregation | accuracy after (mean [95% CI]) | MiB per client | updates weight-capped / clipped / clipped per key |",
        "| --- | --- | --- | --- |",
    ]
    for label, title in TITLES.items():
        row = summary.get(label)
        if row:
            m, lo, hi = row["accuracy"]
            c = row["clipped"]
            lines.append(f"| {title} | {m:.3f} [{lo:.3f}, {hi:.3f}] | {row['bytes_per_client'] / MiB:.1f} | "
                         f"{c['weight_capped']} / {c['clipped']} / {c['clipped_per_key']} of {c['updates']} |")
    for key, what in (("paired", "bounded"), ("paired_dp", "DP-FedAvg")):
        if key in summary:
            p = summary[key]
            m, lo, hi = p["difference"]
            lines += ["", f"Seed-paired difference {what} − plain: {100 * m:+.1f} points [{100 * lo:+.1f}, {100 * hi:+.1f}] "
                          f"(per seed {', '.join(f'{100 * d:+.1f}' for d in p['differences'])}); bytes ratio {p['bytes_ratio']:.4f}."]
    dp = summary.get("dp", {})
    if "epsilon_aggregate" in dp:
        lines += ["", f"DP-FedAvg's budget (delta {dp['delta']:g}): epsilon {dp['epsilon_aggregate']:.3g} against anyone who sees "
                      f"the published adapters, {dp['epsilon_coordinator']:.3g} against the coordinator."]
    lines += ["", "## Signing (Ed25519, every coordinator message)", "",
              "| message | bytes unsigned | + signature | encode+decode time, signed / unsigned | signed encode+decode MiB/s |",
              "| --- | --- | --- | --- | --- |"]
    for name, row in signing.items():
        lines.append(f"| {name} | {row['bytes_unsigned']:,} | +{row['extra_bytes']} | {row['time_ratio']:.2f}x | {row['signed_mib_per_s']:.0f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(summary: dict[str, Any], path: Path) -> None:
    """Accuracy per setting with its interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label in SETTINGS if label in summary]
    means = [summary[label]["accuracy"][0] for label in labels]
    errors = [[m - summary[label]["accuracy"][1] for label, m in zip(labels, means)],
              [summary[label]["accuracy"][2] - m for label, m in zip(labels, means)]]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    names = {"on": "bounded", "off": "plain FedAvg", "dp": "DP-FedAvg"}
    colors = {"on": "tab:green", "off": "tab:gray", "dp": "tab:purple"}
    ax.bar([names[label] for label in labels], means, yerr=errors, capsize=6, color=[colors[label] for label in labels])
    if labels:
        ax.axhline(summary[labels[0]]["accuracy_before"], color="k", linestyle=":", label="zero-shot")
        ax.legend()
    ax.set_ylabel("accuracy after (95% CI)")
    ax.set_ylim(0.5, 1.0)
    ax.set_title("Safety settings: the demo's accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--examples-per-client", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="the 2-round smoke preset of benchmarks/paper.py")
    parser.add_argument("--repeats", type=int, default=30, help="timed encode+decode repeats per message shape")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"which of {', '.join(SETTINGS)} to run")
    parser.add_argument("--partition", default="iid", choices=("iid", "dirichlet"), help="how the clients' data is split")
    parser.add_argument("--dirichlet-alpha", type=float, default=0.5)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    chosen = [s for s in args.settings.split(",") if s]
    if set(chosen) - set(SETTINGS):
        parser.error(f"unknown setting(s) {sorted(set(chosen) - set(SETTINGS))}; choose from {', '.join(SETTINGS)}")
    split = {"partition": args.partition, "dirichlet_alpha": args.dirichlet_alpha} if args.partition != "iid" else {}
    seeds = [int(s) for s in args.seeds.split(",") if s]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results_path = args.out_dir / "safety.json"
    previous = json.loads(results_path.read_text()).get("runs", []) if results_path.is_file() else []
    runs: list[dict[str, Any]] = []
    signing = signing_cost(args.repeats)
    meta: dict[str, Any] = {"clients": args.clients, "seeds": seeds, "quick": args.quick, "rounds": None, "test_examples": None,
                            "partition": args.partition if not split else f"dirichlet (alpha {args.dirichlet_alpha:g})",
                            "machine": f"{sys.platform} CPU, Python {sys.version.split()[0]}"}
    with tempfile.TemporaryDirectory(prefix="fedsoda-safety-") as tmp:
        for seed in seeds:
            for label, extra in ((c, SETTINGS[c]) for c in chosen):  # the runs of a seed side by side
                overrides = run_settings("rotten_tomatoes", "fedsoda", seed, args.clients, args.quick, "bundled",
                                         {**extra, "run_id": f"safety-{label}-{seed}"})
                done = next((r for r in previous if r["overrides"] == json.loads(json.dumps(overrides))), None)
                if done is None:
                    print(f"{time.strftime('%H:%M:%S')} running {label} seed {seed}", flush=True)
                    done = one_run(overrides, args.clients, args.examples_per_client, Path(tmp), **split)
                    run_dir = Path(tmp) / f"safety-{label}-{seed}"
                    done.update({"setting": label, "seed": seed, "clipped": clipped_updates(run_dir),
                                 "privacy": load_report(run_dir)["results"].get("privacy")})
                runs.append(done)
                meta.update(rounds=done["overrides"].get("rounds.rounds"), test_examples=done["test_examples"])
                print(f"  {label} seed {seed}: accuracy {done['accuracy_after']:.3f}, clipped {done['clipped']}", flush=True)
                summary = summarize(runs)
                # Runs of the file this invocation has not reached (yet) stay in it: an
                # interrupted benchmark loses nothing it had.
                kept = runs + [p for p in previous if all(p["overrides"] != json.loads(json.dumps(r["overrides"])) for r in runs)]
                results_path.write_text(json.dumps({"meta": meta, "runs": kept, "summary": summary, "signing": signing}, indent=2))
    summary = summarize(runs)
    write_markdown(summary, signing, meta, args.out_dir / "safety.md")
    write_plot(summary, args.out_dir / "safety.png")
    print((args.out_dir / "safety.md").read_text())
    return summary


if __name__ == "__main__":
    main()
