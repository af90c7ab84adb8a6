"""The coordinator's CUDA path, proved on a machine with an NVIDIA GPU (one short run).

1. ``prune`` the bundled SmolLM2 on CUDA in bf16 (SGP, ODA with fp32 master weights and
   chunked KL, NF4 packaging), in this process, so that PyTorch's peak GPU memory of the
   whole prune is read with ``torch.cuda.max_memory_allocated``; the tier's package must load.
2. ``simulate`` one round with one client on the same GPU: the coordinator in bf16 on CUDA,
   the client (its profile says ``cuda``) training QLoRA on CUDA; the client's reported peak
   GPU memory and the run's before/after accuracy are read from the run report.

Writes ``benchmarks/results/cuda_check.json`` (or ``--out``) and prints it. On a machine
without CUDA it exits with status 2 and says so; nothing here runs in ``make test``.

    .venv/bin/python benchmarks/cuda_check.py [--out FILE] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def _prune(workdir: Path) -> dict:
    import torch
    from typer.testing import CliRunner

    from coordinator.cli import app
    from shared.subllm import load_package

    torch.cuda.reset_peak_memory_stats()
    start = time.monotonic()
    out = workdir / "prune"
    result = CliRunner().invoke(app, [
        "prune", "--model", "bundled", "--out", str(out), "--device", "cuda", "--dtype", "bf16",
        "--depths", "18", "--calib-samples", "32", "--eval-samples", "8", "--oda-steps", "8", "--json",
    ])
    if result.exit_code != 0:
        raise SystemExit(f"prune on CUDA failed:\n{result.output}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    model, _, meta = load_package(out / "tiers" / "L18" / "v1")
    return {
        "seconds": round(time.monotonic() - start, 1),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / GIB,
        "perplexity": report["perplexity"],
        "package_precision": meta.precision,
        "package_layers": len(meta.layer_map),
    }


def _one_round(workdir: Path) -> dict:
    from coordinator.run.reports import load_report, per_client_rounds
    from coordinator.settings import RunConfig, preset
    from coordinator.simulate import SimulationOptions, simulate
    from shared.config import load_config

    overrides = preset("demo")
    overrides.update({"rounds.rounds": 1, "rounds.min_clients": 1, "model.device": "cuda", "model.dtype": "bf16"})
    config = load_config(RunConfig, None, overrides=overrides)
    # No --profile: the client detects this machine, so it trains on the GPU it finds.
    options = SimulationOptions(clients=1, examples_per_client=64)
    start = time.monotonic()
    outcome, _clients = simulate(config, options, workdir / "run")
    rows = per_client_rounds(load_report(outcome.run_dir))
    return {
        "seconds": round(time.monotonic() - start, 1),
        "status": outcome.status,
        "evaluation": (outcome.results or {}).get("evaluation", {}),
        "client_peak_gpu_gib": max((r["peak_gpu_bytes"] for r in rows), default=0) / GIB,
        "client_device_class": [r["device_class"] for r in rows],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cuda_check.json")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("cuda_check: PyTorch sees no CUDA GPU on this machine; run it where one is.", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedsoda-cuda-"))
    result = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "prune": _prune(workdir),
        "one_round": _one_round(workdir),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
