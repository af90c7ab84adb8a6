"""Systems costs: coordinator aggregation and client framework overhead.

One run measures, on the CPU:

- aggregation of N = 1,000 simulated client deltas shaped like the demo's real adapter
  (PEFT LoRA from ``RunConfig()``'s training settings, r = 8 on q_proj/v_proj, over the 18
  layers the default tier keeps of SmolLM2-135M, canonical full-LLM keys), through
  ``get_strategy("fedavg").aggregate``, two ways:

  * ``strategy``: a generator builds each delta (seeded ``torch.randn``) when FedAvg asks for
    it; the time spent generating is subtracted, so the figure is FedAvg's alone;
  * ``persisted``: the server's path: every delta saved once with ``RunDir.save_update``,
    then streamed back with ``PersistedUpdate.load_delta`` (read, sha256, safetensors) into
    FedAvg, as ``CoordinatorServer._aggregate`` does;

  each as bytes of deltas per second and as a ratio to ``dst.copy_(src)`` of the same bytes
  in delta-sized blocks (sources rotate over a 64 MiB pool, so they come from memory, not
  cache), repeats interleaved, best of each kept. All on one torch thread: FedAvg's per-key
  tensors are below torch's parallel grain size, so it is single-threaded anyway, and a
  2-thread copy on a shared machine mostly measures waiting for the other thread;
- coordinator memory vs N (10, 100, 1000): each (path, N) in a fresh subprocess, peak RSS
  (``VmHWM``, reset through ``/proc/self/clear_refs`` just before) minus the RSS just before
  aggregating (Linux only), and the least-squares slope in bytes per extra client
  (target ~0: FedAvg streams);
- client framework overhead per training step: ``edge_client.trainer.train_adapter`` (the
  real client path: proximal term, clipping, per-step batching, no checkpoints) against a
  bare PEFT loop (``get_peft_model`` + AdamW + forward/backward on pre-built batches, same
  batches) on a 4-layer cut of SmolLM2 in fp32 and from its nf4 package, batch 4,
  seq 64, r 8, q/v, 12 steps after 2 warm-up, interleaved step by step (the bare step runs
  from the client's progress callback, on its own copy of the model and the same batch);
  ratio = median over steps of client step / bare step. The cost of the
  client's extra per-step work (batching, proximal term, clipping) is timed on its own too.

Writes benchmarks/results/systems.json, systems.md and systems.png (memory vs N).

Usage: ``python benchmarks/systems.py [--quick] [--no-nf4] [--out-dir DIR]``.

This script is over 450 lines because its two measurements share one results file and one
run (the README's systems table reports them side by side); each part is self-contained.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from coordinator.settings import RunConfig  # noqa: E402
from shared.adapters import LoraSettings  # noqa: E402
from shared.protocol import TrainingParams  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
MiB = 1024 * 1024
POOL_BYTES = 64 * MiB
TARGET_CLIENTS = 1000
CUT_LAYERS = 4

Shapes = dict[str, tuple[int, ...]]


# ------------------------------------------------------------------ adapter and deltas


def adapter_shapes(config: RunConfig | None = None) -> Shapes:
    """Canonical keys and shapes of the global adapter of ``config``'s largest tier.

    Built as ``ModelPipeline.initial_adapter`` builds it: PEFT LoRA on the full bundled
    model with ``layers_to_transform`` = the tier's kept layers. Which layers a tier keeps
    comes from SGP at run time; every decoder layer has the same shapes, so the benchmark
    takes the uniform-drop map of the same depth.

    Args:
        config: Run configuration (default: ``RunConfig()``, the demo's).

    Returns:
        Key -> shape, in PEFT's key order.
    """
    from peft import get_peft_model, get_peft_model_state_dict

    from coordinator.model.models import load_model
    from coordinator.model.surgery import find_decoder_layers
    from shared.layermap import default_depth, uniform_drop_layers

    config = config or RunConfig()
    model, _ = load_model(config.model.model)
    prefix, layers = find_decoder_layers(model)
    depth = max(config.pruning.depths or [default_depth(len(layers), config.pruning.block_size)])
    kept = uniform_drop_layers(len(layers), depth)
    training = config.training
    peft_model = get_peft_model(
        model,
        LoraSettings.from_training(training).peft_config(layers=kept, layers_prefix=prefix),
    )
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}


def delta_bytes(shapes: Shapes) -> int:
    """Bytes of one float32 delta of these shapes."""
    return sum(4 * torch.Size(s).numel() for s in shapes.values())


def client_examples(client: int) -> int:
    """Simulated example count n_c of client ``client`` (10..100, deterministic)."""
    return 10 + (client * 37) % 91


def client_delta(shapes: Shapes, client: int) -> dict[str, torch.Tensor]:
    """Simulated float32 delta of client ``client``: ``torch.randn`` seeded by the client."""
    gen = torch.Generator().manual_seed(client)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def delta_stream(shapes: Shapes, n_clients: int, clock: list[float] | None = None) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(n_c, delta)`` for clients ``0..n_clients-1``, building each only when asked.

    The generator drops its reference to a delta before building the next, so with a
    streaming strategy one delta at a time is alive.

    Args:
        shapes: Adapter shapes.
        n_clients: How many clients.
        clock: If given, ``clock[0]`` accumulates the seconds spent generating.
    """
    for c in range(n_clients):
        t0 = time.perf_counter()
        delta = client_delta(shapes, c)
        if clock is not None:
            clock[0] += time.perf_counter() - t0
        yield client_examples(c), delta
        del delta


def global_state(shapes: Shapes) -> dict[str, torch.Tensor]:
    """A round's global adapter of these shapes (seeded, float32)."""
    gen = torch.Generator().manual_seed(2**31 - 1)  # no client uses this seed
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def persist_deltas(shapes: Shapes, n_clients: int, folder: Path) -> float:
    """Save the simulated deltas of ``n_clients`` clients as round-1 updates of a RunDir.

    Args:
        shapes: Adapter shapes.
        n_clients: How many clients.
        folder: The run directory (created).

    Returns:
        Seconds spent in ``RunDir.save_update`` (atomic, fsynced writes).
    """
    from coordinator.run.checkpoint import RunDir

    run_dir, spent = RunDir(folder), 0.0
    for c, (n, delta) in enumerate(delta_stream(shapes, n_clients)):
        t0 = time.perf_counter()
        run_dir.save_update(1, f"client-{c:05d}", delta, num_examples=n, message_id=f"m{c}")
        spent += time.perf_counter() - t0
    return spent


def persisted_stream(folder: Path, n_clients: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """The server's stream (``CoordinatorServer._aggregate``) over the first ``n_clients`` updates."""
    from coordinator.run.checkpoint import RunDir

    persisted = RunDir(folder).updates(1)[:n_clients]
    return ((u.num_examples, u.load_delta()) for u in persisted)


# ------------------------------------------------------------------ aggregation speed


def memcpy_seconds(block_bytes: int, n_blocks: int) -> float:
    """Seconds for ``n_blocks`` ``dst.copy_(src)`` of ``block_bytes`` each, sources rotating over 64 MiB."""
    numel = block_bytes // 4
    srcs = [torch.ones(numel) for _ in range(max(1, POOL_BYTES // block_bytes))]
    dst = torch.empty(numel)
    t0 = time.perf_counter()
    for i in range(n_blocks):
        dst.copy_(srcs[i % len(srcs)])
    return time.perf_counter() - t0


def aggregation_throughput(shapes: Shapes, n_clients: int, repeats: int, workdir: Path) -> dict:
    """Time FedAvg over ``n_clients`` deltas (generated and persisted) against memcpy.

    Args:
        shapes: Adapter shapes.
        n_clients: Clients per aggregation.
        repeats: Interleaved repeats (memcpy, strategy, persisted); the best of each is kept.
            Runs on one torch thread (see the module docstring).
        workdir: Where the persisted updates are written (``workdir/run``).

    Returns:
        Seconds and bytes per second of each, the ratios to memcpy, and the write time.
    """
    from coordinator.run.aggregation import get_strategy

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _aggregation_throughput(get_strategy("fedavg"), shapes, n_clients, repeats, workdir)
    finally:
        torch.set_num_threads(threads)


def _aggregation_throughput(fedavg, shapes: Shapes, n_clients: int, repeats: int, workdir: Path) -> dict:
    state = global_state(shapes)
    block = delta_bytes(shapes)
    total = block * n_clients
    write_s = persist_deltas(shapes, n_clients, workdir / "run")
    times: dict[str, list[float]] = {"memcpy": [], "strategy": [], "persisted": [], "generation": []}
    for _ in range(repeats):
        times["memcpy"].append(memcpy_seconds(block, n_clients))
        clock = [0.0]
        t0 = time.perf_counter()
        fedavg.aggregate(state, delta_stream(shapes, n_clients, clock))
        times["strategy"].append(time.perf_counter() - t0 - clock[0])
        times["generation"].append(clock[0])
        t0 = time.perf_counter()
        fedavg.aggregate(state, persisted_stream(workdir / "run", n_clients))
        times["persisted"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    out = {"n_clients": n_clients, "delta_bytes": block, "total_bytes": total, "repeats": repeats,
           "persist_write_s": write_s, "persist_write_bytes_per_s": total / write_s}
    for name in ("memcpy", "strategy", "persisted"):
        out[f"{name}_s"] = best[name]
        out[f"{name}_bytes_per_s"] = total / best[name]
    out["generation_s"] = best["generation"]
    out["strategy_ratio"] = best["memcpy"] / best["strategy"]
    out["persisted_ratio"] = best["memcpy"] / best["persisted"]
    out["all_times_s"] = times
    return out


# ------------------------------------------------------------------ memory vs N


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _memory_child(spec: dict) -> dict:
    """Aggregate in this (fresh) process and report its peak RSS growth."""
    from coordinator.run.aggregation import get_strategy

    shapes = {k: tuple(v) for k, v in spec["shapes"].items()}
    fedavg, state = get_strategy("fedavg"), global_state(shapes)
    n = int(spec["n_clients"])
    if spec["path"] == "strategy":
        updates = delta_stream(shapes, n)
    else:
        updates = persisted_stream(Path(spec["folder"]), n)
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM) to the current RSS
    fedavg.aggregate(state, updates)
    peak = _status_bytes("VmHWM")
    return {"rss_before": before, "peak_rss": peak, "growth": peak - before}


def memory_vs_clients(shapes: Shapes, counts: list[int], folder: Path) -> dict:
    """Peak RSS growth of one aggregation per (path, N), each in a fresh subprocess.

    Args:
        shapes: Adapter shapes.
        counts: Client counts N (``folder`` must hold at least ``max(counts)`` updates).
        folder: A run directory written by :func:`persist_deltas`.

    Returns:
        Per path: growth in bytes per N and the least-squares slope in bytes per client.
    """
    out: dict = {"n_clients": counts, "delta_bytes": delta_bytes(shapes)}
    for path in ("strategy", "persisted"):
        growth = []
        for n in counts:
            spec = {"path": path, "n_clients": n, "folder": str(folder), "shapes": shapes}
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", json.dumps(spec)],
                capture_output=True, text=True, check=True, cwd=REPO,
            )
            growth.append(json.loads(proc.stdout.strip().splitlines()[-1])["growth"])
        out[f"{path}_growth_bytes"] = growth
        out[f"{path}_slope_bytes_per_client"] = _slope(counts, growth)
    return out


def _slope(xs: list[int], ys: list[int]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


# ------------------------------------------------------------------ client overhead


def _bench_params(steps: int) -> TrainingParams:
    return dataclasses.replace(RunConfig().training, local_steps=steps)


def bench_batches(tokenizer, dataset, n: int) -> list[dict[str, torch.Tensor]]:
    """The batches ``train_adapter`` draws in steps ``0..n-1`` of round 0 (same seed)."""
    from edge_client.data import batch_indices, make_batch
    from edge_client.trainer import round_seed

    params = _bench_params(n)
    seed = round_seed(int(params.seed), 0)
    return [
        make_batch(dataset, tokenizer, batch_indices(len(dataset), params.batch_size, seed, s), params.seq_len)
        for s in range(n)
    ]


class BareLoop:
    """A bare PEFT training loop: ``get_peft_model``, AdamW, forward/backward, one step per call.

    Args:
        model: A causal LM, bare; LoRA is injected here and removed by :meth:`close`.
        params: Rank, alpha, dropout, targets and learning rate come from here.
    """

    def __init__(self, model: torch.nn.Module, params: TrainingParams) -> None:
        from peft import get_peft_model

        torch.manual_seed(0)
        self.model = get_peft_model(
            model,
            LoraSettings.from_training(params).peft_config(),
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate, weight_decay=0.0)
        self.model.train()

    def step(self, batch: dict[str, torch.Tensor]) -> float:
        """One optimizer step on ``batch``; returns its seconds."""
        t0 = time.perf_counter()
        self.model(**batch, use_cache=False).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Remove the LoRA layers; the base model comes back bare, in eval mode."""
        self.model.unload().eval()


def paired_steps(client_model, bare_model, tokenizer, dataset, steps: int, warmup: int) -> dict:
    """Client steps and bare steps, interleaved step by step on the same batches.

    ``train_adapter`` runs as the client runs it (checkpointing off); from its progress
    callback, right after client step k, the bare loop takes its step k on the same batch
    (on its own copy of the model). A client step is timed from the callback's return to
    the next callback, so the bare step is not counted in it. Adjacent pairs see the same
    machine load, which a busy shared machine otherwise turns into noise.

    Args:
        client_model: The model ``train_adapter`` trains.
        bare_model: An identical copy for the bare loop.
        tokenizer: The tokenizer.
        dataset: The local dataset.
        steps: Timed steps (after ``warmup`` untimed ones, >= 1).
        warmup: Warm-up steps.

    Returns:
        ``client_step_s`` and ``bare_step_s`` (paired lists) and ``client_call_outside_steps_s``
        (the call's time outside its steps, from the trainer's own step timings).
    """
    from edge_client.trainer import TrainOptions, train_adapter

    total_steps = warmup + steps
    params = _bench_params(total_steps)
    batches = bench_batches(tokenizer, dataset, total_steps)
    bare = BareLoop(bare_model, params)
    client_s: list[float] = []
    bare_s: list[float] = []
    resumed, in_callbacks = [0.0], [0.0]

    def after_client_step(progress) -> None:
        ended = time.perf_counter()
        if progress.step > warmup:
            client_s.append(ended - resumed[0])
        seconds = bare.step(batches[progress.step - 1])
        if progress.step > warmup:
            bare_s.append(seconds)
        resumed[0] = time.perf_counter()
        in_callbacks[0] += resumed[0] - ended

    try:
        t0 = time.perf_counter()
        result = train_adapter(client_model, tokenizer, dataset, params, None, list(range(CUT_LAYERS)), "model.layers", "cpu", options=TrainOptions(progress_cb=after_client_step))
        total = time.perf_counter() - t0 - in_callbacks[0]  # the bare steps ran inside the call
    finally:
        bare.close()
    outside = total - result.metrics["step_seconds_mean"] * total_steps
    return {"client_step_s": client_s, "bare_step_s": bare_s, "client_call_outside_steps_s": outside}


def extra_work_seconds(model, tokenizer, dataset, reps: int = 20) -> dict[str, float]:
    """Seconds per step of the client's work a bare loop lacks: batching, proximal term, clipping."""
    from edge_client.data import make_batch
    from edge_client.lora import adapter_parameters, attach_lora, detach_lora
    from edge_client.trainer import proximal_term

    params = _bench_params(1)
    t0 = time.perf_counter()
    for i in range(reps):
        make_batch(dataset, tokenizer, range(4 * i, 4 * i + params.batch_size), params.seq_len)
    batching = (time.perf_counter() - t0) / reps
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    peft_model = attach_lora(model, params)
    try:
        adapter = adapter_parameters(peft_model)
        theta = {k: p.detach().float().clone() for k, p in adapter.items()}
        t0 = time.perf_counter()
        for _ in range(reps):
            proximal_term(adapter, theta).backward()
        prox = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.nn.utils.clip_grad_norm_(list(adapter.values()), 1.0)
        clip = (time.perf_counter() - t0) / reps
    finally:
        detach_lora(peft_model)
        for p in model.parameters():
            p.requires_grad_(requires_grad[id(p)])
        model.eval()
    return {"make_batch_s": batching, "proximal_term_fwd_bwd_s": prox, "clip_grad_norm_s": clip}


def client_overhead(steps: int, warmup: int, precisions: list[str], workdir: Path) -> dict:
    """Client s/step vs bare PEFT s/step on a cut SmolLM2, steps paired (:func:`paired_steps`).

    Args:
        steps: Timed steps per precision (after ``warmup`` untimed ones).
        warmup: Warm-up steps (>= 1).
        precisions: ``"fp32"`` (the cut copy) and/or ``"nf4"`` (its nf4 package).
        workdir: Where the nf4 package is written.

    Returns:
        Per precision: the paired step times, their medians, the median of the per-pair
        ratios (the headline) and the ratio of medians; the extra work timings.
    """
    from coordinator.model.datasets import movie_reviews
    from coordinator.model.models import bundled_model_path, cut_model_copy, load_model
    from coordinator.model.presets import task_preset
    from edge_client.data import dataset_from_records
    from shared.config import cache_dir

    cut = cut_model_copy(bundled_model_path(), cache_dir() / "test-models" / f"smollm2-cut{CUT_LAYERS}", CUT_LAYERS)
    dataset = dataset_from_records(movie_reviews("rotten_tomatoes")[:256], task_preset("rotten_tomatoes"), source="rotten_tomatoes")
    out: dict = {"model": f"SmolLM2-135M cut to {CUT_LAYERS} layers", "steps": steps, "warmup": warmup,
                 "params": dataclasses.asdict(_bench_params(warmup + steps))}
    for precision in precisions:
        if precision == "nf4":
            from coordinator.model.packaging import write_package
            from shared.subllm import load_package

            model, tokenizer = load_model(cut)
            write_package(model, tokenizer, list(range(CUT_LAYERS)), "L4", 1, workdir / "nf4", "nf4", full_num_layers=30)
            (model, tokenizer, _), (bare_model, _, _) = load_package(workdir / "nf4"), load_package(workdir / "nf4")
        else:
            (model, tokenizer), (bare_model, _) = load_model(cut), load_model(cut)
        pairs = paired_steps(model, bare_model, tokenizer, dataset, steps, warmup)
        client, bare = pairs["client_step_s"], pairs["bare_step_s"]
        out[precision] = {
            **pairs,
            "client_median": statistics.median(client), "bare_median": statistics.median(bare),
            "ratio": statistics.median(c / b for c, b in zip(client, bare)),
            "ratio_of_medians": statistics.median(client) / statistics.median(bare),
        }
        if precision == precisions[0]:
            out["extra_work"] = extra_work_seconds(model, tokenizer, dataset)
    return out


# ------------------------------------------------------------------ report


def machine() -> dict:
    """Where the benchmark ran."""
    return {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg_at_start": list(os.getloadavg()),
    }


def _gbps(x: float) -> str:
    return f"{x / 1e9:.2f} GB/s"


def markdown(result: dict) -> str:
    """The results as a markdown report."""
    agg, mem, cli, m = result["aggregation"], result["memory"], result["client"], result["machine"]
    mib = lambda b: f"{b / MiB:.2f} MiB"  # noqa: E731
    lines = [
        "# Systems: aggregation and client overhead",
        "",
        f"Machine: {m['cpu_count']} CPUs ({m['torch_threads']} torch threads), torch {m['torch']}, "
        f"Python {m['python']}, {m['platform']}; load average at start {m['load_avg_at_start'][0]:.1f}."
        + (" Quick (smoke) run." if result["quick"] else ""),
        "",
        f"Adapter: {result['adapter']['keys']} tensors, {mib(agg['delta_bytes'])} per float32 delta "
        f"({result['adapter']['description']}).",
        "",
        f"## Aggregation of {agg['n_clients']} client deltas ({mib(agg['total_bytes'])})",
        "",
        "| path | seconds | throughput | vs memcpy |",
        "|---|---:|---:|---:|",
        f"| memcpy `dst.copy_(src)` (delta-sized blocks) | {agg['memcpy_s']:.3f} | {_gbps(agg['memcpy_bytes_per_s'])} | 1.00x |",
        f"| FedAvg, deltas generated on demand (generation excluded) | {agg['strategy_s']:.3f} | "
        f"{_gbps(agg['strategy_bytes_per_s'])} | {agg['strategy_ratio']:.2f}x |",
        f"| FedAvg, server path (load_delta: read + sha256 + safetensors) | {agg['persisted_s']:.3f} | "
        f"{_gbps(agg['persisted_bytes_per_s'])} | {agg['persisted_ratio']:.2f}x |",
        f"| (persisting them: RunDir.save_update, fsynced) | {agg['persist_write_s']:.3f} | "
        f"{_gbps(agg['persist_write_bytes_per_s'])} | |",
        "",
        f"Best of {agg['repeats']} interleaved repeats, one torch thread. "
        f"Generating the deltas took {agg['generation_s']:.2f} s (not counted).",
        "",
        "## Coordinator memory vs number of clients",
        "",
        "| N | peak RSS growth, generated | peak RSS growth, server path |",
        "|---:|---:|---:|",
        *(f"| {n} | {mib(a)} | {mib(b)} |" for n, a, b in
          zip(mem["n_clients"], mem["strategy_growth_bytes"], mem["persisted_growth_bytes"])),
        f"| slope (bytes / extra client) | {mem['strategy_slope_bytes_per_client']:.0f} | "
        f"{mem['persisted_slope_bytes_per_client']:.0f} |",
        "",
        f"One delta is {agg['delta_bytes']} bytes: a slope of that size would mean every delta is kept. "
        "Each (path, N) runs in a fresh process; growth = peak RSS (VmHWM, reset just before) - RSS before aggregating.",
        "",
        f"## Client framework overhead per training step ({cli['model']}, batch {cli['params']['batch_size']}, "
        f"seq {cli['params']['seq_len']}, r {cli['params']['lora_rank']}, {'/'.join(cli['params']['target_modules'])})",
        "",
        "| weights | train_adapter s/step | bare PEFT loop s/step | ratio (median of pairs) | ratio of medians |",
        "|---|---:|---:|---:|---:|",
    ]
    for precision in ("fp32", "nf4"):
        if precision in cli:
            c = cli[precision]
            lines.append(f"| {precision} | {c['client_median']:.4f} | {c['bare_median']:.4f} | "
                         f"{c['ratio']:.3f}x | {c['ratio_of_medians']:.3f}x |")
    extra = cli["extra_work"]
    lines += [
        "",
        f"{cli['steps']} timed steps after {cli['warmup']} warm-up, interleaved step by step: after each "
        "train_adapter step its progress callback runs the bare loop's step on the same batch (own model copy). "
        f"The client's extra per-step work timed alone: make_batch {extra['make_batch_s'] * 1e3:.2f} ms, "
        f"proximal term fwd+bwd {extra['proximal_term_fwd_bwd_s'] * 1e3:.2f} ms, "
        f"clip_grad_norm {extra['clip_grad_norm_s'] * 1e3:.2f} ms. Per round the client also pays "
        f"{cli[cli_first(cli)]['client_call_outside_steps_s']:.3f} s outside its steps "
        "(LoRA attach, init, delta, unload).",
        "",
        f"Runtime {result['runtime_s']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def cli_first(cli: dict) -> str:
    """The first precision measured in a client result."""
    return "fp32" if "fp32" in cli else "nf4"


def plot(mem: dict, path: Path) -> None:
    """Peak RSS growth vs N for both aggregation paths, one delta's size for scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("strategy", "FedAvg, generated deltas"), ("persisted", "FedAvg, server path (from disk)")):
        ax.plot(mem["n_clients"], [g / MiB for g in mem[f"{key}_growth_bytes"]], marker="o", label=label)
    ns = mem["n_clients"]
    ax.plot(ns, [n * mem["delta_bytes"] / MiB for n in ns], ls=":", color="grey", label="if every delta were kept")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("clients aggregated (N)")
    ax.set_ylabel("peak RSS growth (MiB)")
    ax.set_title("Coordinator memory vs number of clients")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(quick: bool, nf4: bool, out_dir: Path) -> dict:
    """Run every measurement and write systems.json / .md / .png into ``out_dir``.

    Args:
        quick: Smoke run: N up to 50, one repeat, 2 client steps (1 warm-up), fp32 only.
        nf4: Also time the client on the nf4 package (not in a quick run).
        out_dir: Output folder (created).

    Returns:
        The result dict written to systems.json.
    """
    start = time.perf_counter()
    info = machine()
    counts = [10, 50] if quick else [10, 100, TARGET_CLIENTS]
    config = RunConfig()
    shapes = adapter_shapes(config)
    t = config.training
    with tempfile.TemporaryDirectory(prefix="fedsoda-systems-") as tmp:
        work = Path(tmp)
        aggregation = aggregation_throughput(shapes, max(counts), 1 if quick else 3, work)
        memory = memory_vs_clients(shapes, counts, work / "run")
        client = client_overhead(1 if quick else 12, 1 if quick else 2,
                                 ["fp32", "nf4"] if nf4 and not quick else ["fp32"], work)
    result = {
        "quick": quick,
        "machine": info,
        "adapter": {
            "keys": len(shapes),
            "delta_bytes": delta_bytes(shapes),
            "description": f"LoRA r={t.lora_rank} on {'/'.join(t.target_modules)}, "
                           f"{len(shapes) // (2 * len(t.target_modules))} layers of SmolLM2-135M",
            "shapes": {k: list(v) for k, v in shapes.items()},
        },
        "aggregation": aggregation,
        "memory": memory,
        "client": client,
    }
    result["runtime_s"] = time.perf_counter() - start
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "systems.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "systems.md").write_text(markdown(result))
    plot(memory, out_dir / "systems.png")
    return result


def main(argv: list[str] | None = None) -> dict:
    """Command line entry point; prints the markdown report.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The result dict (empty for the internal ``--memory-child`` role).
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: N up to 50, 2 client steps, fp32 only")
    parser.add_argument("--no-nf4", dest="nf4", action="store_false", help="time the client on fp32 weights only")
    parser.add_argument("--out-dir", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(_memory_child(json.loads(args.memory_child))))
        return {}
    result = run(args.quick, args.nf4, args.out_dir)
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
