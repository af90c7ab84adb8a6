"""The prune pipeline: SGP ranking, sub-LLM tiers, ODA, perplexity report and packages.

Used by ``fedsoda-coordinator prune`` and by ``benchmarks/pruning.py``. Everything long
reports progress through a :class:`ProgressSink` so the CLI can show a progress bar while
the library itself stays silent (it only logs).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from coordinator.model import sgp
from coordinator.model.evaluation import batches_nll, tokenize_texts
from coordinator.model.oda import ODAConfig, distill
from coordinator.model.packaging import write_package
from coordinator.model.surgery import (
    build_submodel,
    find_decoder_layers,
    parameter_count,
)
from shared.errors import ConfigError, DataError
from shared.layermap import blocks_for_depth, kept_layers, uniform_drop_layers

log = logging.getLogger(__name__)


class ProgressSink(Protocol):
    """Where long steps report progress (the CLI passes a rich progress bar)."""

    def start(self, description: str, total: int) -> Callable[[int], None]:
        """Open a task.

        Args:
            description: What the step does.
            total: Units of work in the step.

        Returns:
            A function that advances the task by n units.
        """
        ...


class _Silent:
    def start(self, description: str, total: int) -> Callable[[int], None]:
        log.info("%s (%d steps)", description, total)
        return lambda n: None


@dataclass(frozen=True)
class PruneConfig:
    """Settings of a prune run.

    Attributes:
        block_size: Layers per SGP block ``n``.
        depth: Layers the smallest sub-LLM keeps (default: 60% of the full depth, rounded to
            a reachable depth).
        tiers: Further (larger) depths to package; all tiers share one ranking (nested).
        keep_head: Protected layers at the start.
        keep_tail: Protected layers at the end.
        token: SGP token mode, ``"all"`` or ``"last"``.
        calib_samples: Public paragraphs for SGP (and ODA).
        seq_len: Tokens per calibration / distillation sequence.
        batch_size: Sequences per SGP forward.
        eval_samples: Held-out paragraphs for perplexity (disjoint from calibration).
        eval_seq_len: Tokens per held-out paragraph.
        oda: Distillation settings; None skips ODA.
        oda_batch_size: Sequences per ODA step.
        baseline_oda: Also distil the uniform-drop baseline (FedOT does one distillation).
        precision: Package precision (``nf4``, ``bf16``, ``fp32``).
        package: Write the tier packages.
        seed: Seed of the calibration / held-out split.
    """

    block_size: int = 4
    depth: int | None = None
    tiers: tuple[int, ...] = ()
    keep_head: int = 1
    keep_tail: int = 1
    token: str = "all"
    calib_samples: int = 64
    seq_len: int = 128
    batch_size: int = 8
    eval_samples: int = 32
    eval_seq_len: int = 256
    oda: ODAConfig | None = field(default_factory=ODAConfig)
    oda_batch_size: int = 4
    baseline_oda: bool = True
    precision: str = "nf4"
    package: bool = True
    seed: int = 0


@dataclass(frozen=True)
class PruneReport:
    """Everything a prune run found (plain types, JSON-ready via :meth:`to_dict`).

    Attributes:
        model: Model name.
        num_layers: Layers of the full LLM.
        layers_prefix: Dotted path of its decoder layer list.
        block_size: SGP block size.
        distances: ``distances[l][n - 1] = d(l, n)``; None where the block does not fit.
        ranking: Non-overlapping blocks in pruning order, with their distance.
        depth: Depth of the compared sub-LLMs.
        sgp_layers: Layer map of the SGP sub-LLM at ``depth``.
        uniform_layers: Layer map of the uniform-drop sub-LLM at ``depth``.
        tiers: Tier name -> layer map (nested).
        perplexity: Row name -> held-out perplexity.
        parameters: Row name -> parameter count.
        oda: Row name -> ODA summary (first/last loss, steps, trained layers).
        packages: Tier name -> package folder.
        seconds: Step name -> wall seconds.
        settings: The :class:`PruneConfig` as a dict.
    """

    model: str
    num_layers: int
    layers_prefix: str
    block_size: int
    distances: list[list[float | None]]
    ranking: list[dict[str, Any]]
    depth: int
    sgp_layers: list[int]
    uniform_layers: list[int]
    tiers: dict[str, list[int]]
    perplexity: dict[str, float]
    parameters: dict[str, int]
    oda: dict[str, dict[str, Any]]
    packages: dict[str, str]
    seconds: dict[str, float]
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict."""
        return asdict(self)


def tier_name(depth: int) -> str:
    """Name of the tier that keeps ``depth`` layers (e.g. ``"d18"``)."""
    return f"d{depth}"


def default_depth(num_layers: int, block_size: int, fraction: float = 0.6) -> int:
    """The reachable depth closest to ``fraction`` of the full depth (at least one block pruned).

    Args:
        num_layers: Layers of the full LLM.
        block_size: Layers per SGP block.
        fraction: Share of layers to keep.

    Returns:
        ``num_layers - p * block_size`` for the ``p >= 1`` that comes closest.
    """
    blocks = max(1, round((1 - fraction) * num_layers / block_size))
    return num_layers - blocks * block_size


def split_public_text(texts: Sequence[str], calib: int, held_out: int, seed: int) -> tuple[list[str], list[str]]:
    """Disjoint calibration and held-out paragraphs after a seeded shuffle.

    Args:
        texts: Public paragraphs.
        calib: Paragraphs for calibration.
        held_out: Paragraphs for perplexity.
        seed: Shuffle seed.

    Returns:
        ``(calibration, held_out)``.

    Raises:
        DataError: Fewer paragraphs than ``calib + held_out``.
    """
    if len(texts) < calib + held_out:
        raise DataError(
            f"the public data has {len(texts)} paragraphs; {calib} calibration + {held_out} held-out are needed "
            "(lower --calib-samples / --eval-samples or pass more text)"
        )
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[i] for i in order[:calib]], [texts[i] for i in order[len(order) - held_out :]]


def _perplexity(model: nn.Module, batches, sink: ProgressSink, label: str) -> float:
    advance = sink.start(f"perplexity: {label}", len(batches))
    total, count = batches_nll(model, batches, advance)
    return math.exp(total / count)


def _oda_summary(stats) -> dict[str, Any]:
    return {
        "steps": stats.steps,
        "trained_layers": list(stats.trainable_layers),
        "first_loss": stats.first_loss,
        "last_loss": stats.last_loss,
        "loss": list(stats.loss),
    }


def run_prune(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    out_dir: str | Path,
    config: PruneConfig = PruneConfig(),
    *,
    model_name: str = "model",
    sink: ProgressSink | None = None,
) -> PruneReport:
    """Run SGP (+ ODA) on a full LLM, compare with uniform drop, and package the tiers.

    Steps: split the public text into calibration and held-out parts; compute every block
    distance; rank blocks; build the SGP sub-LLM and the uniform-drop sub-LLM at the same
    depth; measure held-out perplexity of full / SGP / uniform, then again after ODA; write
    a package per tier (ODA applied when enabled); write ``report.json``, ``report.md`` and
    ``distances.png`` to ``out_dir``.

    Args:
        model: The full LLM (not modified).
        tokenizer: Its tokenizer.
        texts: Public paragraphs.
        out_dir: Output folder.
        config: Settings.
        model_name: Name recorded in the report and packages.
        sink: Progress reporting (silent by default).

    Returns:
        The report.

    Raises:
        ConfigError: Depth / block size / tiers that cannot be reached.
        DataError: Too little public text.
    """
    sink = sink or _Silent()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix, layers = find_decoder_layers(model)
    num_layers = len(layers)
    n = config.block_size
    depth = config.depth if config.depth is not None else default_depth(num_layers, n)
    depths = sorted({depth, *config.tiers})
    for d in depths:
        blocks_for_depth(num_layers, d, n)  # validates every tier before any work
    seconds: dict[str, float] = {}

    calib_texts, held_texts = split_public_text(texts, config.calib_samples, config.eval_samples, config.seed)
    calib = tokenize_texts(tokenizer, calib_texts, max_length=config.seq_len, batch_size=config.batch_size)
    held = tokenize_texts(tokenizer, held_texts, max_length=config.eval_seq_len, batch_size=config.batch_size)
    oda_batches = tokenize_texts(tokenizer, calib_texts, max_length=config.seq_len, batch_size=config.oda_batch_size)

    started = time.perf_counter()
    advance = sink.start("SGP: block distances", len(calib))
    distances = sgp.compute_block_distances(model, calib, max_block=num_layers, token=config.token, progress=advance)  # type: ignore[arg-type]
    ranking = sgp.rank_blocks(distances, n, config.keep_head, config.keep_tail)
    seconds["sgp"] = time.perf_counter() - started
    needed = blocks_for_depth(num_layers, depths[0], n)
    if needed > len(ranking):
        raise ConfigError(
            f"depth {depths[0]} needs {needed} blocks of {n} but only {len(ranking)} fit between the protected layers"
        )
    tiers = {tier_name(d): kept_layers(num_layers, ranking, blocks_for_depth(num_layers, d, n)) for d in depths}
    sgp_layers = tiers[tier_name(depth)]
    # FedOT keeps the first and last 2 layers; very shallow sub-LLMs keep what they can.
    uniform_layers = uniform_drop_layers(num_layers, depth, keep_ends=min(2, depth // 2))

    perplexity: dict[str, float] = {}
    parameters: dict[str, int] = {"full": parameter_count(model)}
    started = time.perf_counter()
    perplexity["full"] = _perplexity(model, held, sink, "full")
    sgp_model = build_submodel(model, sgp_layers)
    uniform_model = build_submodel(model, uniform_layers)
    parameters["sgp"] = parameter_count(sgp_model)
    parameters["uniform"] = parameter_count(uniform_model)
    perplexity["sgp"] = _perplexity(sgp_model, held, sink, f"SGP {depth} layers")
    perplexity["uniform"] = _perplexity(uniform_model, held, sink, f"uniform drop {depth} layers")
    seconds["perplexity_before_oda"] = time.perf_counter() - started

    oda_stats: dict[str, dict[str, Any]] = {}
    aligned: dict[str, nn.Module] = {}
    if config.oda is not None and config.oda.steps > 0:
        runs = [("sgp", sgp_model, sgp_layers)]
        if config.baseline_oda:
            runs.append(("uniform", uniform_model, uniform_layers))
        for row, sub, kept in runs:
            started = time.perf_counter()
            advance = sink.start(f"ODA: {row} ({config.oda.align_layers} layers)", config.oda.steps)
            stats = distill(model, sub, kept, oda_batches, config.oda, progress=advance)
            oda_stats[row] = _oda_summary(stats)
            seconds[f"oda_{row}"] = time.perf_counter() - started
            perplexity[f"{row}+oda"] = _perplexity(sub, held, sink, f"{row} after ODA")
            aligned[row] = sub

    packages: dict[str, str] = {}
    if config.package:
        started = time.perf_counter()
        advance = sink.start(f"packaging {len(tiers)} tier(s) ({config.precision})", len(tiers))
        for name, kept in tiers.items():
            if kept == sgp_layers and "sgp" in aligned:
                sub = aligned["sgp"]
            else:
                sub = build_submodel(model, kept)
                if config.oda is not None and config.oda.steps > 0:
                    stats = distill(model, sub, kept, oda_batches, config.oda)
                    oda_stats[f"tier {name}"] = _oda_summary(stats)
            folder = out / "packages" / name
            write_package(
                sub, tokenizer, kept, name, 1, folder, config.precision, name=model_name, full_num_layers=num_layers
            )
            packages[name] = str(folder)
            advance(1)
        seconds["packaging"] = time.perf_counter() - started

    table = [[None if math.isnan(float(v)) else round(float(v), 6) for v in row] for row in distances]
    report = PruneReport(
        model=model_name,
        num_layers=num_layers,
        layers_prefix=prefix,
        block_size=n,
        distances=table,
        ranking=[{"layers": block, "distance": round(float(distances[block[0], n - 1]), 6)} for block in ranking],
        depth=depth,
        sgp_layers=sgp_layers,
        uniform_layers=uniform_layers,
        tiers=tiers,
        perplexity=perplexity,
        parameters=parameters,
        oda=oda_stats,
        packages=packages,
        seconds={k: round(v, 2) for k, v in seconds.items()},
        settings=_settings_dict(config),
    )
    write_report(report, out)
    return report


def _settings_dict(config: PruneConfig) -> dict[str, Any]:
    data = asdict(replace(config, oda=None))
    data["oda"] = asdict(config.oda) if config.oda is not None else None
    data["tiers"] = list(config.tiers)
    return data


def plot_distances(report: PruneReport, path: str | Path) -> Path:
    """Heat-map of the block distance table with the chosen blocks outlined.

    Args:
        report: A prune report.
        path: PNG file to write.

    Returns:
        ``path`` as a Path.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    values = torch.tensor([[math.nan if v is None else v for v in row] for row in report.distances])
    fig, ax = plt.subplots(figsize=(8, 6))
    image = ax.imshow(values.numpy(), aspect="auto", origin="lower", cmap="viridis")
    fig.colorbar(image, ax=ax, label="angular distance d(l, n)")
    ax.set_xlabel("block size n")
    ax.set_ylabel("block start layer l")
    ax.set_xticks(range(values.shape[1]))
    ax.set_xticklabels([str(i + 1) for i in range(values.shape[1])], fontsize=6)
    pruned = report.num_layers - report.depth
    for block in report.ranking[: pruned // report.block_size]:
        start = block["layers"][0]
        ax.add_patch(Rectangle((report.block_size - 1.5, start - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    ax.set_title(f"SGP block distances, {report.model} ({report.num_layers} layers); red: pruned blocks")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report_markdown(report: PruneReport) -> str:
    """Markdown summary: chosen blocks and the perplexity table."""
    rows = [
        ("Full LLM", "full", report.num_layers),
        ("Uniform drop (FedOT), first/last 2 kept", "uniform", report.depth),
        (f"SGP (block size {report.block_size})", "sgp", report.depth),
        ("Uniform drop + ODA", "uniform+oda", report.depth),
        ("SGP + ODA", "sgp+oda", report.depth),
    ]
    lines = [
        f"Model: {report.model}, {report.num_layers} layers -> {report.depth} layers.",
        "",
        "| Model | Layers | Held-out perplexity |",
        "|---|---:|---:|",
    ]
    for label, key, layers in rows:
        if key in report.perplexity:
            lines.append(f"| {label} | {layers} | {report.perplexity[key]:.2f} |")
    pruned = report.num_layers - report.depth
    chosen = [b["layers"] for b in report.ranking[: pruned // report.block_size]]
    lines += [
        "",
        f"SGP pruned blocks (in ranking order): {chosen}",
        f"SGP layer map: {report.sgp_layers}",
        f"Uniform-drop layer map: {report.uniform_layers}",
    ]
    for row, stats in report.oda.items():
        lines.append(
            f"ODA {row}: {stats['steps']} steps, trained layers {stats['trained_layers']}, "
            f"loss {stats['first_loss']:.3f} -> {stats['last_loss']:.3f}"
        )
    return "\n".join(lines) + "\n"


def write_report(report: PruneReport, out_dir: str | Path) -> None:
    """Write ``report.json``, ``report.md`` and ``distances.png`` into ``out_dir``.

    Args:
        report: A prune report.
        out_dir: Existing folder.
    """
    out = Path(out_dir)
    (out / "report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    (out / "report.md").write_text(report_markdown(report), encoding="utf-8")
    plot_distances(report, out / "distances.png")
