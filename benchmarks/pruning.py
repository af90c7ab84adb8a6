"""Does SGP pick better layers than uniform drop, and does ODA recover more? (SmolLM2-135M, 30 -> 18 layers)

Runs the prune pipeline on the real bundled SmolLM2-135M-Instruct with Wikipedia
calibration text: SGP (blocks of 4 layers, first and last layer protected) against the
FedOT-style uniform drop (first and last 2 layers kept) at the same depth, held-out
perplexity before and after ODA, and the size of the 4-bit package.

Writes ``benchmarks/results/pruning.json``, ``pruning.md`` and ``pruning_distances.png``.
Sized for about 10 minutes on 2 otherwise idle CPU cores (longer when they are shared):

    .venv/bin/python benchmarks/pruning.py            # defaults below
    .venv/bin/python benchmarks/pruning.py --oda-steps 48 --block-size 2
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark and write its results.

    Args:
        argv: Command-line arguments (default: ``sys.argv[1:]``).

    Returns:
        The result dict that was written to ``pruning.json``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--public-data", default="wikipedia")
    parser.add_argument("--depth", type=int, default=18)
    parser.add_argument("--block-size", type=int, default=4)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--oda-steps", type=int, default=24)
    parser.add_argument("--oda-lr", type=float, default=3e-4)
    parser.add_argument("--oda-batch-size", type=int, default=2)
    parser.add_argument("--align-layers", default="bridge", choices=["bridge", "all"])
    parser.add_argument("--precision", default="nf4", choices=["nf4", "bf16", "fp32"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from coordinator.model.datasets import public_text
    from coordinator.model.models import load_model
    from coordinator.model.oda import ODAConfig
    from coordinator.model.prune_study import PruneConfig, report_markdown, run_prune

    started = time.perf_counter()
    model, tokenizer = load_model(args.model)
    texts = public_text(args.public_data)
    config = PruneConfig(
        block_size=args.block_size,
        depth=args.depth,
        calib_samples=args.calib_samples,
        eval_samples=args.eval_samples,
        seq_len=args.seq_len,
        eval_seq_len=args.eval_seq_len,
        oda=ODAConfig(steps=args.oda_steps, learning_rate=args.oda_lr, align_layers=args.align_layers),
        oda_batch_size=args.oda_batch_size,
        precision=args.precision,
    )
    work = Path(tempfile.mkdtemp(prefix="fedsoda-bench-pruning-"))
    try:
        report = run_prune(model, tokenizer, texts, work, config, model_name="SmolLM2-135M-Instruct")
        package_bytes = {
            name: sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
            for name, folder in report.packages.items()
        }
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(work / "distances.png", args.out / "pruning_distances.png")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ppl = report.perplexity
    checks = {
        "sgp_beats_uniform": ppl["sgp"] < ppl["uniform"],
        "oda_improves_sgp": ppl.get("sgp+oda", float("inf")) < ppl["sgp"],
        "sgp_oda_beats_uniform_oda": ppl.get("sgp+oda", float("inf")) < ppl.get("uniform+oda", float("inf")),
    }
    result = {
        "question": "SGP vs uniform layer drop at equal depth, before and after ODA (held-out Wikipedia perplexity)",
        "public_data": args.public_data,
        "report": report.to_dict(),
        "package_bytes": package_bytes,
        "checks": checks,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    (args.out / "pruning.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# Pruning: SGP vs uniform drop, before and after ODA",
        "",
        report_markdown(report).rstrip(),
        "",
        f"Calibration: {args.calib_samples} Wikipedia paragraphs x {args.seq_len} tokens; held-out: "
        f"{args.eval_samples} other paragraphs x {args.eval_seq_len} tokens. ODA: {args.oda_steps} steps, "
        f"lr {args.oda_lr}, {args.align_layers} layers trainable, batch {args.oda_batch_size} x {args.seq_len} tokens.",
        "Package size (" + args.precision + "): "
        + ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in package_bytes.items()),
        f"Checks: {checks}. Wall time: {result['wall_seconds']:.0f} s.",
        "",
        "![distances](pruning_distances.png)",
    ]
    (args.out / "pruning.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if all(outcome["checks"].values()) else 1)
