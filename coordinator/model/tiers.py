"""The tier builder: the one place that turns a full LLM into prepared, packaged sub-LLM tiers.

Given the full model, public-text calibration batches and a :class:`TierSpec` (method, depths,
SGP settings, pre-alignment, precision), :func:`build_tiers`:

1. ranks SGP blocks, when the method keeps layers by ranking (:mod:`coordinator.model.methods`);
2. picks each tier's layer map through the method (tiers cut from one ranking nest);
3. builds each sub-LLM and pre-aligns it with ODA where the method distils;
4. keeps the tensors ODA changed and writes package version 1 with its manifest, in the
   primary precision; :func:`add_precisions` then writes the same tier in the other
   precisions a run needs (for devices without 4-bit kernels).

Everything lands in one folder, laid out the same for ``prune`` (its output folder) and
``serve`` (its run directory): see :mod:`coordinator.model.tierset`, which also reloads and
adopts it. :func:`realign_tiers` publishes the next version of every tier, in every precision
it is published in. Tiers are named after their depth (``L18`` keeps 18 layers).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.model import sgp
from coordinator.model.evaluation import Batch
from coordinator.model.methods import LayerChoice, Method, get_method
from coordinator.model.oda import ODAConfig, distill
from coordinator.model.packaging import write_package
from coordinator.model.progress import LogSink, ProgressSink
from coordinator.model.surgery import build_submodel, find_decoder_layers
from coordinator.model.tierset import (
    TIERS_FOLDER,
    PreparedTier,
    TierSet,
    model_fingerprint,
    package_name,
    tier_from_folder,
)
from shared.adapters import LoraSettings
from shared.errors import ConfigError
from shared.layermap import blocks_for_depth, default_depth, tier_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TierSpec:
    """What tiers to build.

    Attributes:
        method: A method name of :data:`coordinator.model.methods.METHODS`.
        depths: Layers each tier keeps; empty: one tier of about 60% of the layers.
        block_size: Layers per SGP block.
        keep_head: First layers SGP never prunes.
        keep_tail: Last layers SGP never prunes.
        token: SGP distance over ``all`` non-padding tokens or the ``last`` one.
        precision: Package precision (``nf4``, ``bf16``, ``fp32``).
        pre_align: ODA settings of the pre-alignment (its ``align_layers`` is the configured
            choice; the method may override it); None or 0 steps: no pre-alignment.
        model_name: Name recorded in the packages and manifests.
    """

    method: str
    depths: tuple[int, ...] = ()
    block_size: int = 1
    keep_head: int = 1
    keep_tail: int = 1
    token: str = "all"
    precision: str = "nf4"
    pre_align: ODAConfig | None = None
    model_name: str = "model"

    def __post_init__(self) -> None:
        get_method(self.method)  # a clear error for an unknown name, before any work
        object.__setattr__(self, "depths", tuple(int(d) for d in self.depths))

    def resolved_depths(self, num_layers: int) -> tuple[int, ...]:
        """The depths to build on a ``num_layers``-layer model, checked, shallowest first.

        Raises:
            ConfigError: A depth the block size cannot reach.
        """
        method = get_method(self.method)
        depths = method.depths(num_layers, self.depths or (default_depth(num_layers, self.block_size),))
        if method.keep is not None:
            for depth in depths:
                blocks_for_depth(num_layers, depth, self.block_size)
        return depths

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for the record."""
        data = dataclasses.asdict(self)
        data["depths"] = list(self.depths)
        return data


@dataclass(frozen=True)
class FullModel:
    """The full LLM a run cuts its tiers from, with what building and aligning them reads.

    Attributes:
        model: The full causal LM (never modified; the teacher of ODA).
        tokenizer: Its tokenizer (packaged with every tier).
        calibration: Public-text batches for SGP and ODA.
    """

    model: nn.Module
    tokenizer: Any
    calibration: Sequence[Batch]


def build_tiers(
    full: FullModel,
    spec: TierSpec,
    root: str | Path,
    *,
    sink: ProgressSink | None = None,
    distances: torch.Tensor | None = None,
) -> TierSet:
    """Rank, cut, pre-align and package every tier of ``spec`` into ``root`` (see the module docstring).

    Args:
        full: The full LLM, its tokenizer and the calibration batches.
        spec: What to build.
        root: Output folder (created).
        sink: Progress reporting (logged by default).
        distances: A block distance table already measured on ``full_model``
            (:func:`coordinator.model.sgp.compute_block_distances`); measured here when the
            method ranks blocks and none is given.

    Returns:
        The tiers, recorded in ``root``.

    Raises:
        ConfigError: A depth that cannot be reached, or too few rankable blocks for it.
    """
    sink = sink or LogSink()
    method = get_method(spec.method)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    prefix, layers = find_decoder_layers(full.model)
    num_layers = len(layers)
    depths = spec.resolved_depths(num_layers)  # every depth checked before any work
    ranking = _ranking(full, spec, method, sink, distances)
    packager = _Packager(root, full.tokenizer, spec.model_name, num_layers)

    tiers: dict[str, PreparedTier] = {}
    oda: dict[str, dict[str, Any]] = {}
    for depth in depths:
        kept = method.layer_map(LayerChoice(num_layers, depth, ranking, spec.block_size))
        name = tier_name(len(kept))
        student = build_submodel(full.model, kept)
        align_layers = method.pre_align_layers(spec.pre_align.align_layers) if spec.pre_align else None
        if spec.pre_align is not None and spec.pre_align.steps > 0 and align_layers is not None:
            advance = sink.start(f"ODA: aligning tier {name} ({len(kept)} layers) to the full model", spec.pre_align.steps)
            oda_config = dataclasses.replace(spec.pre_align, align_layers=align_layers)
            stats = distill(full.model, student, kept, full.calibration, oda_config, progress=advance)
            log.info("tier %s: distillation loss %.4f -> %.4f", name, stats.first_loss, stats.last_loss)
            oda[name] = stats.summary()
        _save_aligned(full.model, prefix, student, kept, root / TIERS_FOLDER / name / "aligned_v1.safetensors")
        tiers[name] = packager.package(student, kept, name, 1, spec.precision, sink)
        del student  # freed before the next tier's copy is made
    tierset = TierSet(
        root=root, method=method.name, num_layers=num_layers, layers_prefix=prefix,
        fingerprint=model_fingerprint(full.model), ranking=ranking, tiers=tiers, spec=spec.to_dict(), oda=oda,
    )
    tierset.save()
    return tierset


def _ranking(
    full: FullModel, spec: TierSpec, method: Method, sink: ProgressSink, distances: torch.Tensor | None
) -> list[list[int]]:
    if not method.ranks_blocks:
        return []
    if distances is None:
        num_layers = len(find_decoder_layers(full.model)[1])
        advance = sink.start(f"SGP: measuring block distances of {num_layers} layers on public text", len(full.calibration))
        # Only the ranked block size is needed here; `prune` measures every size for its heat-map.
        distances = sgp.compute_block_distances(
            full.model, full.calibration, max_block=spec.block_size, token=spec.token, progress=advance  # type: ignore[arg-type]
        )
    ranking = sgp.rank_blocks(distances, spec.block_size, spec.keep_head, spec.keep_tail)
    num_layers = distances.shape[0]
    needed = max(blocks_for_depth(num_layers, d, spec.block_size) for d in spec.resolved_depths(num_layers))
    if needed > len(ranking):
        raise ConfigError(
            f"depth {num_layers - needed * spec.block_size} needs {needed} blocks of {spec.block_size} but only "
            f"{len(ranking)} fit between the {spec.keep_head} protected head and {spec.keep_tail} tail layers"
        )
    return ranking


def _save_aligned(full_model: nn.Module, prefix: str, student: nn.Module, kept: Sequence[int], path: Path) -> None:
    """Keep the student's tensors that differ from the full model's (the aligned layers), in
    the coordinator's dtype: a bf16 run writes half of what fp32 would, and nothing else."""
    from safetensors.torch import save_file

    full = full_model.state_dict()
    layer_prefix = prefix + "."
    changed = {}
    for key, value in student.state_dict().items():
        ref_key = key
        if key.startswith(layer_prefix):  # student layer i is full-model layer kept[i]
            index, _, rest = key[len(layer_prefix):].partition(".")
            ref_key = f"{layer_prefix}{kept[int(index)]}.{rest}"
        if ref_key not in full or not torch.equal(full[ref_key], value):
            changed[key] = value.detach().to("cpu").contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(changed, str(path))


@dataclass(frozen=True)
class _Packager:
    """Writes a package and its manifest (what every version of every package shares)."""

    root: Path
    tokenizer: Any
    model_name: str
    num_layers: int

    def package(
        self, student: nn.Module, kept: list[int], name: str, version: int, precision: str, sink: ProgressSink
    ) -> PreparedTier:
        folder = self.root / TIERS_FOLDER / name / f"v{version}"
        advance = sink.start(f"packaging {name} v{version} ({precision})", 1)
        write_package(
            student, self.tokenizer, kept, name, version, folder,
            precision=precision, name=self.model_name, full_num_layers=self.num_layers,
        )
        advance(1)
        if version > 1:
            _link_unchanged(self.root / TIERS_FOLDER / name / f"v{version - 1}", folder)
        return tier_from_folder(name, kept, version, folder, self.model_name)


def _link_unchanged(previous: Path, folder: Path) -> None:
    """Make each file of ``folder`` that is byte-identical to the previous version's a hard
    link to it: a re-alignment that trains the bridge layers re-writes every shard, but the
    disk holds the unchanged ones once (the old version stays served to clients mid-download)."""
    import filecmp
    import os

    if not previous.is_dir():
        return
    for path in folder.rglob("*"):
        old = previous / path.relative_to(folder)
        if path.is_file() and old.is_file() and filecmp.cmp(old, path, shallow=False):
            staging = path.with_name(path.name + ".link")
            os.link(old, staging)
            os.replace(staging, path)


def add_precisions(
    tierset: TierSet, full: FullModel, precisions: Sequence[str], *, sink: ProgressSink | None = None
) -> TierSet:
    """Publish every tier also in each of ``precisions`` it lacks (same version, same aligned
    weights), for devices that cannot run the primary precision.

    Args:
        tierset: The tiers (built, adopted or reloaded).
        full: The full LLM the tiers were cut from.
        precisions: Package precisions every tier must have.
        sink: Progress reporting.

    Returns:
        The tiers with the new packages, recorded in ``tierset.root`` (``tierset`` itself when
        nothing was missing).
    """
    sink = sink or LogSink()
    primary = tierset.spec["precision"]
    packager = _Packager(tierset.root, full.tokenizer, tierset.spec["model_name"], tierset.num_layers)
    tiers = dict(tierset.tiers)
    for tier, packages in tierset.packages_by_tier().items():
        have = {p.precision for p in packages}
        missing = [p for p in precisions if p not in have]
        if not missing:
            continue
        source = packages[0]
        student = tierset.aligned_student(full.model, source.name)
        for precision in missing:
            name = package_name(tier, precision, primary)
            tiers[name] = packager.package(student, source.kept, name, source.version, precision, sink)
        del student
    if tiers == tierset.tiers:
        return tierset
    updated = dataclasses.replace(tierset, tiers=tiers)
    updated.save()
    return updated


def realign_tiers(
    tierset: TierSet,
    full: FullModel,
    global_adapter: Mapping[str, torch.Tensor],
    lora: LoraSettings,
    realign: ODAConfig,
    version: int,
    *,
    sink: ProgressSink | None = None,
) -> TierSet:
    """Re-align every tier with the global adapter plugged in and publish it as ``version``.

    Each tier is distilled once; each of its packages (one per precision) is written anew
    from that one aligned student.

    Args:
        tierset: The current tiers.
        full: The full LLM (the teacher; left unchanged), its tokenizer and calibration batches.
        global_adapter: The current global adapter (canonical full-LLM keys).
        lora: Its LoRA settings.
        realign: ODA settings of the re-alignment (``align_layers`` = what it trains).
        version: The new package version.
        sink: Progress reporting.

    Returns:
        The new tiers, recorded in ``tierset.root``.
    """
    sink = sink or LogSink()
    tiers, oda = dict(tierset.tiers), dict(tierset.oda)
    packager = _Packager(tierset.root, full.tokenizer, tierset.spec["model_name"], tierset.num_layers)
    grouped = tierset.packages_by_tier()
    for tier, packages in grouped.items():
        kept = packages[0].kept
        advance = sink.start(f"ODA: re-aligning tier {tier} with the global adapter (v{version})", realign.steps)
        student = tierset.aligned_student(full.model, packages[0].name)
        stats = distill(
            full.model, student, kept, full.calibration, realign, global_adapter=global_adapter, lora=lora, progress=advance
        )
        oda[tier] = stats.summary()
        _save_aligned(full.model, tierset.layers_prefix, student, kept, tierset.aligned_path(tier, version))
        for package in packages:
            tiers[package.name] = packager.package(student, kept, package.name, version, package.precision, sink)
        del student
    updated = dataclasses.replace(tierset, tiers=tiers, oda=oda)
    updated.save()
    # Once the record names the new version, nothing reads the old aligned weights (resume and
    # the next re-alignment start from the current version): the disk holds one per tier.
    for tier, packages in grouped.items():
        old = tierset.aligned_path(tier, packages[0].version)
        if old != updated.aligned_path(tier, version):
            old.unlink(missing_ok=True)
    return updated
