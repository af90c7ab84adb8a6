"""The prune study: does SGP pick better layers than uniform drop, and does ODA recover more?

``fedsoda-coordinator prune`` (and ``benchmarks/pruning.py``) run it: SGP measures every block
distance on public text (the whole table, for the heat-map), the tier builder
(:mod:`coordinator.model.tiers`) cuts, pre-aligns and packages the tiers into the output
folder, exactly as ``serve`` lays them out in a run directory (so ``serve --tiers OUT`` reuses
them), and this module compares held-out perplexity of the full model, the SGP sub-LLM and the
uniform-drop (FedOT) sub-LLM at the same depth, before and after ODA, then writes
``report.json``, ``report.md`` and ``distances.png``.

Everything long reports progress through a :class:`~coordinator.model.progress.ProgressSink`
so the CLI can show it while the library itself stays silent (it only logs).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.model import sgp
from coordinator.model.evaluation import batches_nll, tokenize_texts
from coordinator.model.footprint import CoordinatorWorkload
from coordinator.model.lm_head import DEFAULT_CHUNK_TOKENS
from coordinator.model.methods import FEDSODA
from coordinator.model.oda import ODAConfig, distill
from coordinator.model.progress import LogSink, ProgressSink
from coordinator.model.surgery import (
    build_submodel,
    find_decoder_layers,
    parameter_count,
)
from coordinator.model.tiers import FullModel, TierSpec, build_tiers
from shared.errors import DataError
from shared.layermap import tier_name, uniform_drop_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PruneConfig:
    """Settings of a prune run.

    Attributes:
        block_size: Layers per SGP block ``n``.
        depths: Layers each tier keeps (empty: about 60% of the full depth, rounded to a
            reachable depth); all tiers share one ranking (nested). The smallest is the one
            compared with uniform drop.
        keep_head: Protected layers at the start.
        keep_tail: Protected layers at the end.
        token: SGP token mode, ``"all"`` or ``"last"``.
        calib_samples: Public paragraphs for SGP (and ODA).
        seq_len: Tokens per calibration / distillation sequence.
        batch_size: Sequences per SGP forward.
        eval_samples: Held-out paragraphs for perplexity (disjoint from calibration).
        eval_seq_len: Tokens per held-out paragraph.
        oda: Distillation settings of the tiers' pre-alignment; None skips ODA.
        oda_batch_size: Sequences per ODA step.
        baseline_oda: Also distil the uniform-drop baseline (FedOT does one distillation).
        precision: Package precision (``nf4``, ``bf16``, ``fp32``).
        seed: Seed of the calibration / held-out split.
    """

    block_size: int = 4
    depths: tuple[int, ...] = ()
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
    seed: int = 0

    @property
    def chunk_tokens(self) -> int:
        """Tokens whose logits exist at once, in ODA's KL and in perplexity alike."""
        return self.oda.kl_chunk_tokens if self.oda else DEFAULT_CHUNK_TOKENS

    def workload(self, num_layers: int, device: str, dtype: str) -> CoordinatorWorkload:
        """What this study asks of the coordinator's memory (for :func:`coordinator.model.preflight.preflight`)."""
        oda = self.oda
        return CoordinatorWorkload(
            dtype=dtype, device=device, calibration_batch_size=self.batch_size, seq_len=self.seq_len,  # type: ignore[arg-type]
            depths=self.tier_spec("").resolved_depths(num_layers), align_layers=oda.align_layers if oda else "bridge",
            block_size=self.block_size, oda_steps=oda.steps if oda else 0, precision=self.precision,  # type: ignore[arg-type]
            kl_chunk_tokens=self.chunk_tokens,
            gradient_checkpointing=oda.gradient_checkpointing if oda else True,
            oda_batch_size=self.oda_batch_size, eval_batch_size=self.batch_size, eval_seq_len=self.eval_seq_len,
            num_layers=num_layers, baseline_student=bool(oda) and self.baseline_oda,
        )

    def tier_spec(self, model_name: str) -> TierSpec:
        """The FedSODA tiers this study builds."""
        return TierSpec(
            method=FEDSODA.name, depths=self.depths, block_size=self.block_size, keep_head=self.keep_head,
            keep_tail=self.keep_tail, token=self.token, precision=self.precision, pre_align=self.oda,
            model_name=model_name,
        )


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


def _perplexity(model: nn.Module, batches, sink: ProgressSink, label: str, chunk_tokens: int) -> float:
    advance = sink.start(f"perplexity: {label}", len(batches))
    total, count = batches_nll(model, batches, advance, chunk_tokens=chunk_tokens)
    return math.exp(total / count)


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
    """Run the study (see the module docstring) and write its tiers and report into ``out_dir``.

    Args:
        model: The full LLM (not modified).
        tokenizer: Its tokenizer.
        texts: Public paragraphs.
        out_dir: Output folder: the tiers (:mod:`coordinator.model.tiers` layout) and the report.
        config: Settings.
        model_name: Name recorded in the report and packages.
        sink: Progress reporting (logged by default).

    Returns:
        The report.

    Raises:
        ConfigError: Depth / block size / tiers that cannot be reached.
        DataError: Too little public text.
    """
    sink = sink or LogSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prefix, layers = find_decoder_layers(model)
    num_layers = len(layers)
    spec = config.tier_spec(model_name)
    depths = spec.resolved_depths(num_layers)  # validates every tier before any work
    depth = depths[0]
    seconds: dict[str, float] = {}

    calib_texts, held_texts = split_public_text(texts, config.calib_samples, config.eval_samples, config.seed)
    calib = tokenize_texts(tokenizer, calib_texts, max_length=config.seq_len, batch_size=config.batch_size)
    held = tokenize_texts(tokenizer, held_texts, max_length=config.eval_seq_len, batch_size=config.batch_size)
    oda_batches = tokenize_texts(tokenizer, calib_texts, max_length=config.seq_len, batch_size=config.oda_batch_size)

    started = time.perf_counter()
    advance = sink.start("SGP: block distances", len(calib))
    # Every block size, for the heat-map; the tiers use the column of config.block_size.
    distances = sgp.compute_block_distances(model, calib, max_block=num_layers, token=config.token, progress=advance)  # type: ignore[arg-type]
    seconds["sgp"] = time.perf_counter() - started

    started = time.perf_counter()
    tierset = build_tiers(FullModel(model, tokenizer, oda_batches), spec, out, sink=sink, distances=distances)
    seconds["tiers"] = time.perf_counter() - started
    tiers = tierset.layer_maps()
    sgp_layers = tiers[tier_name(depth)]
    uniform_layers = uniform_drop_layers(num_layers, depth)

    perplexity: dict[str, float] = {}
    parameters: dict[str, int] = {"full": parameter_count(model)}
    started = time.perf_counter()
    perplexity["full"] = _perplexity(model, held, sink, "full", config.chunk_tokens)
    sgp_model = build_submodel(model, sgp_layers)
    parameters["sgp"] = parameter_count(sgp_model)
    perplexity["sgp"] = _perplexity(sgp_model, held, sink, f"SGP {depth} layers", config.chunk_tokens)
    del sgp_model  # one sub-LLM beside the full model at a time: the peak is full + one student
    uniform_model = build_submodel(model, uniform_layers)
    parameters["uniform"] = parameter_count(uniform_model)
    perplexity["uniform"] = _perplexity(uniform_model, held, sink, f"uniform drop {depth} layers", config.chunk_tokens)
    seconds["perplexity"] = time.perf_counter() - started

    oda_stats: dict[str, dict[str, Any]] = {}
    if tier_name(depth) in tierset.oda:
        oda_stats["sgp"] = tierset.oda[tier_name(depth)]
        oda_stats.update({f"tier {name}": stats for name, stats in tierset.oda.items() if name != tier_name(depth)})
        perplexity["sgp+oda"] = _perplexity(tierset.aligned_student(model, tier_name(depth)), held, sink, "SGP after ODA", config.chunk_tokens)
        if config.baseline_oda and config.oda is not None:
            started = time.perf_counter()
            advance = sink.start(f"ODA: uniform drop ({config.oda.align_layers} layers)", config.oda.steps)
            oda_stats["uniform"] = distill(model, uniform_model, uniform_layers, oda_batches, config.oda, progress=advance).summary()
            seconds["oda_uniform"] = time.perf_counter() - started
            perplexity["uniform+oda"] = _perplexity(uniform_model, held, sink, "uniform drop after ODA", config.chunk_tokens)

    table = [[None if math.isnan(float(v)) else round(float(v), 6) for v in row] for row in distances]
    n = config.block_size
    report = PruneReport(
        model=model_name,
        num_layers=num_layers,
        layers_prefix=prefix,
        block_size=n,
        distances=table,
        ranking=[{"layers": block, "distance": round(float(distances[block[0], n - 1]), 6)} for block in tierset.ranking],
        depth=depth,
        sgp_layers=sgp_layers,
        uniform_layers=uniform_layers,
        tiers=tiers,
        perplexity=perplexity,
        parameters=parameters,
        oda=oda_stats,
        packages={name: str(t.folder) for name, t in tierset.tiers.items()},
        seconds={k: round(v, 2) for k, v in seconds.items()},
        settings=_settings_dict(config),
    )
    write_report(report, out)
    return report


def _settings_dict(config: PruneConfig) -> dict[str, Any]:
    data = asdict(replace(config, oda=None))
    data["oda"] = asdict(config.oda) if config.oda is not None else None
    data["depths"] = list(config.depths)
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
