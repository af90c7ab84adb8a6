"""Does the memory estimator predict what training really takes? Measured on this CPU.

For each configuration (layer count, precision, LoRA rank and targets, batch, sequence
length, checkpointing) a separate process loads the real SmolLM2-135M (or a copy cut to fewer
layers), trains a LoRA adapter for a few steps with the client's own training loop
(:func:`edge_client.trainer.train_adapter`) on IMDB reviews cut to ``seq_len - 0..3`` tokens, so
every batch is full-length and padded like the client's, and exits. Its peak resident set is read
from outside with ``os.wait4`` (the kernel's ``ru_maxrss`` of that one child) and compared
with :func:`hardware_profiles.memory.estimate_training_memory`.

Target: every estimate within 15% of the measurement and never more than 5% below it.

Writes ``benchmarks/results/memory_estimator.{json,md,png}``. Run:

    nice -n 10 .venv/bin/python benchmarks/memory_estimator.py [--quick] [--only N ...]

A child runs as ``memory_estimator.py --worker JSON`` (not for direct use).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TARGET_ABS = 0.15  # |estimate - measured| / measured
TARGET_UNDER = 0.05  # (measured - estimate) / measured

# name, layers, precision, rank, targets, batch, seq_len, grad checkpointing, dropout
CONFIGS = [
    ("full-fp32-b4s128", 30, "fp32", 8, ("q_proj", "v_proj"), 4, 128, False, 0.0),
    ("full-nf4-b4s128", 30, "nf4", 8, ("q_proj", "v_proj"), 4, 128, False, 0.0),
    ("full-fp32-gc-b2s128-r16", 30, "fp32", 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 2, 128, True, 0.0),
    ("l22-nf4-b2s128-qkvo", 22, "nf4", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2, 128, False, 0.0),
    ("l15-fp32-alllinear-b2s128", 15, "fp32", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2, 128, False, 0.0),
    ("l15-nf4-gc-b2s256-r16", 15, "nf4", 16, ("q_proj", "v_proj"), 2, 256, True, 0.0),
    ("l8-fp32-r64-b8s128-drop", 8, "fp32", 64, ("q_proj", "k_proj", "v_proj", "o_proj"), 8, 128, False, 0.05),
    ("l8-fp32-b2s512", 8, "fp32", 8, ("q_proj", "v_proj"), 2, 512, False, 0.0),
    ("l8-nf4-b8s64", 8, "nf4", 8, ("q_proj", "v_proj"), 8, 64, False, 0.0),
    ("l8-bf16-b2s128", 8, "bf16", 8, ("q_proj", "v_proj"), 2, 128, False, 0.0),
    ("l4-bf16-r32-b4s64", 4, "bf16", 32, ("q_proj", "k_proj", "v_proj", "o_proj"), 4, 64, False, 0.0),
    ("l4-fp32-b1s64", 4, "fp32", 8, ("q_proj", "v_proj"), 1, 64, False, 0.0),
]
STEPS = 5  # peaks settle after 3 steps in fp32, 5 with nf4 / bf16 (heap growth)


# --------------------------------------------------------------------------- child


def worker(spec: dict) -> None:
    """Train one configuration and print a JSON line with what happened (runs in a child)."""
    stages: dict[str, int] = {}

    def mark(name: str) -> None:
        stages[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edge_client.trainer import TrainOptions, train_adapter
    from shared.protocol import TrainingParams
    from shared.subllm import disable_cpu_4bit_repacking

    if spec["precision"] == "nf4":
        import bitsandbytes  # noqa: F401  (the client imports it for 4-bit packages)
    mark("imports")
    kwargs: dict = {"dtype": torch.bfloat16 if spec["precision"] == "bf16" else torch.float32}
    if spec["precision"] == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,  # the client's CPU default (shared.subllm)
        )
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **kwargs)
    disable_cpu_4bit_repacking(model)  # the AVX512_BF16 trap (DATA.md)
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    mark("load")
    dataset = _full_length_dataset(spec["data"], tokenizer, spec["seq_len"])
    params = TrainingParams(
        local_steps=spec["steps"],
        learning_rate=1e-4,
        batch_size=spec["batch"],
        seq_len=spec["seq_len"],
        lora_rank=spec["rank"],
        lora_alpha=2.0 * spec["rank"],
        lora_dropout=spec["dropout"],
        target_modules=list(spec["targets"]),
        mu=0.01,
        seed=0,
    )
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    result = train_adapter(model, tokenizer, dataset, params, None, list(range(spec["layers"])), "model.layers", "cpu", options=TrainOptions(progress_cb=lambda p: mark(f"step{p.step}"), gradient_checkpointing=spec["gc"]))
    print(json.dumps({"stages": stages, "metrics": result.metrics}))


def _full_length_dataset(path: str, tokenizer, seq_len: int, n: int = 48):
    """Examples whose tokenized length is ``seq_len - (i % 4)``: batches are padded yet full."""
    from coordinator.model.presets import task_preset
    from edge_client.data import dataset_from_records, tokenize_example

    reviews_task = task_preset("rotten_tomatoes")

    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()[:n]]

    def length(text: str, label: int) -> int:
        example = dataset_from_records([{"text": text, "label": label}], reviews_task).examples[0]
        return len(tokenize_example(tokenizer, example, 4 * seq_len, add_eos=False).input_ids)

    records = []
    for i, row in enumerate(rows):
        ids = tokenizer(row["text"], add_special_tokens=False).input_ids
        target = seq_len - i % 4
        lo, hi = 1, len(ids)
        while lo < hi:  # the most text tokens whose example still fits `target`
            mid = (lo + hi + 1) // 2
            if length(tokenizer.decode(ids[:mid]), row["label"]) <= target:
                lo = mid
            else:
                hi = mid - 1
        records.append({"text": tokenizer.decode(ids[:lo]), "label": row["label"]})
    return dataset_from_records(records, reviews_task, source="benchmark reviews")


# --------------------------------------------------------------------------- parent


def _prepare_models(layer_counts: set[int]) -> dict[int, Path]:
    from coordinator.model.models import bundled_model_path, cut_model_copy
    from shared.config import cache_dir

    full = bundled_model_path()
    dirs = {}
    for n in sorted(layer_counts):
        dirs[n] = full if n == 30 else cut_model_copy(full, cache_dir() / "models" / f"SmolLM2-135M-Instruct-cut{n}", n)
    return dirs


def _prepare_data(folder: Path) -> Path:
    """Long IMDB reviews (3,000+ characters, 600+ tokens): enough text for any seq_len here."""
    from coordinator.model.datasets import movie_reviews

    rng = random.Random(0)
    rows = rng.sample([r for r in movie_reviews("imdb") if len(r["text"]) >= 3000], 48)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _run_child_wait4(spec: dict) -> tuple[int, dict, float]:
    """Start the child and reap it with os.wait4, which returns that child's own rusage."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            stdout=out,
            stderr=err,
            env=env,
            cwd=ROOT,
            preexec_fn=lambda: os.nice(10),
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"configuration {spec['name']} failed (exit {proc.returncode}):\n{err.read()[-3000:]}")
        report = json.loads(out.read().strip().splitlines()[-1])
    return usage.ru_maxrss * 1024, report, wall


def _estimate(model_dir: Path, spec: dict):
    from hardware_profiles.memory import estimate_training_memory
    from hardware_profiles.training_setup import TrainingSetup

    setup = TrainingSetup(
        num_layers=spec["layers"],
        precision=spec["precision"],
        lora_rank=spec["rank"],
        lora_targets=tuple(spec["targets"]),
        lora_dropout=spec["dropout"],
        batch_size=spec["batch"],
        seq_len=spec["seq_len"],
        grad_checkpointing=spec["gc"],
        device="cpu",
        checkpoint_precision="fp32",  # the cut copies are fp32 safetensors; nf4 / bf16 convert at load
    )
    # The full model's config: the estimator cuts it to `layers` itself.
    return estimate_training_memory(model_dir, setup)


def _write_outputs(rows: list[dict], meta: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_estimator.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    mib = 1 << 20
    lines = [
        "# Memory estimator vs measured peak RSS (CPU)",
        "",
        f"{meta['machine']}; torch {meta['torch']}, transformers {meta['transformers']}, "
        f"peft {meta['peft']}, bitsandbytes {meta['bitsandbytes']}. {meta['steps']} training steps per "
        "configuration, each in its own process; peak RSS from `os.wait4`. Model: SmolLM2-135M-Instruct "
        "(30 layers) and copies cut to fewer layers. Estimate: `hardware_profiles.memory.estimate_training_memory`.",
        "",
        f"Target: |error| <= {TARGET_ABS:.0%} and under-estimate <= {TARGET_UNDER:.0%}. "
        f"Result: {meta['passed']} of {len(rows)} configurations meet it; "
        f"worst over-estimate {meta['worst_over']:+.1%}, worst under-estimate {meta['worst_under']:+.1%}.",
        "",
        "| configuration | layers | precision | rank | targets | batch x seq | ckpt | measured MiB | estimate MiB | error | s/step | ok |",
        "|---|---:|---|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['layers']} | {r['precision']} | {r['rank']} | {len(r['targets'])} mod. | "
            f"{r['batch']} x {r['seq_len']} | {'yes' if r['gc'] else 'no'} | {r['measured_bytes'] / mib:.0f} | "
            f"{r['estimate_bytes'] / mib:.0f} | {r['error']:+.1%} | {r['step_seconds']:.2f} | {'yes' if r['ok'] else '**no**'} |"
        )
    lines += [
        "",
        "Estimate breakdown (MiB): framework / weights / LoRA state / activations / logits / allocator / load peak.",
        "",
        "| configuration | framework | weights | lora | activations | logits | allocator | load peak | phase |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        b = r["breakdown"]
        lines.append(
            f"| {r['name']} | {b['framework'] / mib:.0f} | {b['weights'] / mib:.0f} | {b['lora_state'] / mib:.0f} | "
            f"{b['activations'] / mib:.0f} | {b['logits'] / mib:.0f} | {b['allocator'] / mib:.0f} | "
            f"{b['load_peak'] / mib:.0f} | {r['peak_phase']} |"
        )
    if meta.get("throughput_tflops"):
        lines += ["", f"Sustained fp32 LoRA training throughput measured here: {meta['throughput_tflops']:.3f} TFLOP/s "
                  "(median over the fp32 configurations, FLOPs from `hardware_profiles.flops.training_flops`; "
                  "step times include whatever else ran on the machine, so they are not a clean throughput figure)."]
    (RESULTS / "memory_estimator.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 6))
    measured = [r["measured_bytes"] / mib for r in rows]
    estimate = [r["estimate_bytes"] / mib for r in rows]
    top = max(measured + estimate) * 1.1
    ax.plot([0, top], [0, top], color="black", lw=1, label="estimate = measured")
    ax.fill_between([0, top], [0, top * (1 - TARGET_UNDER)], [0, top * (1 + TARGET_ABS)], color="green", alpha=0.12, label="target band (-5% / +15%)")
    colors = {"fp32": "tab:blue", "bf16": "tab:orange", "nf4": "tab:red"}
    for r, m, e in zip(rows, measured, estimate):
        ax.scatter(m, e, color=colors.get(r["precision"], "gray"), marker="s" if r["gc"] else "o", zorder=3)
        ax.annotate(r["name"], (m, e), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for prec, color in colors.items():
        ax.scatter([], [], color=color, label=prec)
    ax.scatter([], [], color="gray", marker="s", label="grad checkpointing")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured peak RSS (MiB)")
    ax.set_ylabel("estimated peak (MiB)")
    ax.set_title("LoRA training memory: estimate vs measured (SmolLM2, CPU)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(RESULTS / "memory_estimator.png", dpi=130)


def main() -> int:
    """Run every configuration and write the results (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these configuration names")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per configuration (default {STEPS})")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    sys.path.insert(0, str(ROOT))
    import peft
    import torch
    import transformers

    from hardware_profiles.flops import training_flops

    try:
        import importlib.metadata as md

        bnb_version = md.version("bitsandbytes")
    except Exception:  # noqa: BLE001
        bnb_version = "absent"
    chosen = [c for c in CONFIGS if not args.only or c[0] in args.only]
    dirs = _prepare_models({c[1] for c in chosen})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare_data(Path(tmp))
        for name, layers, precision, rank, targets, batch, seq_len, gc, dropout in chosen:
            spec = {
                "name": name, "layers": layers, "precision": precision, "rank": rank, "targets": list(targets),
                "batch": batch, "seq_len": seq_len, "gc": gc, "dropout": dropout,
                "model_dir": str(dirs[layers]), "data": str(data), "steps": args.steps,
            }
            measured, report, wall = _run_child_wait4(spec)
            est = _estimate(dirs[30], spec)
            error = (est.total_bytes - measured) / measured
            ok = abs(error) <= TARGET_ABS and error >= -TARGET_UNDER
            step_seconds = float(report["metrics"].get("step_seconds_mean", 0.0))
            flops = training_flops(dirs[30], est.setup)
            row = {
                **{k: v for k, v in spec.items() if k not in ("model_dir", "data")},
                "measured_bytes": measured,
                "estimate_bytes": est.total_bytes,
                "error": error,
                "ok": ok,
                "breakdown": est.breakdown,
                "peak_phase": est.peak_phase,
                "stage_peaks": report["stages"],
                "step_seconds": step_seconds,
                "tflops": flops / step_seconds / 1e12 if step_seconds else 0.0,
                "wall_seconds": wall,
            }
            rows.append(row)
            print(
                f"{name:28s} measured {measured / 2**20:7.0f} MiB  estimate {est.total_bytes / 2**20:7.0f} MiB  "
                f"{error:+6.1%}  {'ok' if ok else 'MISS'}  ({step_seconds:.2f} s/step, {wall:.0f} s)",
                flush=True,
            )
    fp32 = sorted(r["tflops"] for r in rows if r["precision"] == "fp32" and r["tflops"])
    meta = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bnb_version,
        "steps": args.steps,
        "passed": sum(r["ok"] for r in rows),
        "worst_over": max(r["error"] for r in rows),
        "worst_under": min(r["error"] for r in rows),
        "throughput_tflops": fp32[len(fp32) // 2] if fp32 else 0.0,
    }
    if not args.no_write:
        _write_outputs(rows, meta)
    print(f"{meta['passed']}/{len(rows)} within target; worst {meta['worst_under']:+.1%} / {meta['worst_over']:+.1%}")
    return 0 if meta["passed"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
