"""Prepared tiers on disk: the record of what was built, and reading or adopting it.

A folder of tiers (a run directory, or a ``prune`` output) holds::

    ROOT/tiers.json                              the record: method, model fingerprint, ranking,
                                                 tiers (layer map, version), ODA summaries
    ROOT/tiers/<package>/v<k>/                   package version k (format: shared.subllm)
    ROOT/tiers/<tier>/aligned_v<k>.safetensors   the tensors alignment changed, in the
                                                 coordinator's dtype

A tier (a layer map, named ``L<depth>``) is published as one package per precision: the run's
primary precision under the tier's own name (``L18``), every other one under
:func:`package_name` (``L18-bf16``), for devices that cannot run the primary one (a Jetson
without 4-bit kernels). The packages of one tier share its aligned weights: alignment runs
once per tier, packaging once per precision.

The tier builder (:mod:`coordinator.model.tiers`) writes it; ``serve --resume`` reloads it
(:func:`load_tiers`) and ``serve --tiers DIR`` adopts a ``prune`` output as it is
(:func:`adopt_tiers`), after :func:`check_tiers_fit` made sure the tiers were cut from this
run's model by this run's method.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from coordinator.model.surgery import build_submodel, find_decoder_layers, text_config
from shared.errors import ConfigError, RunStateError
from shared.layermap import tier_name
from shared.manifests import build_manifest
from shared.protocol import Manifest
from shared.subllm import read_meta

RECORD_FILE = "tiers.json"
TIERS_FOLDER = "tiers"
RECORD_FORMAT = 1
#: Embedding values hashed into a model's fingerprint (enough to tell checkpoints apart).
_FINGERPRINT_VALUES = 4096


def package_name(tier: str, precision: str, primary: str) -> str:
    """The published name of ``tier``'s package in ``precision``: the tier's own name for the
    run's primary precision, ``<tier>-<precision>`` for any other (e.g. ``L18-bf16``)."""
    return tier if precision == primary else f"{tier}-{precision}"


@dataclass(frozen=True)
class PreparedTier:
    """One published package of a sub-LLM tier.

    Attributes:
        name: Published name (the manifest topic, what a client is assigned): the tier's
            name for the primary precision, :func:`package_name` for the others.
        kept: Full-LLM indices of its layers (its layer map).
        version: Package version (1, then +1 per re-alignment).
        folder: Package folder.
        manifest: Its content-addressed manifest.
        precision: Weight precision of the package (``nf4``, ``bf16``, ``fp32``).
    """

    name: str
    kept: list[int]
    version: int
    folder: Path
    manifest: Manifest
    precision: str

    @property
    def tier(self) -> str:
        """The tier this package is of, ``L<depth>`` (shared by its packages in every precision)."""
        return tier_name(len(self.kept))

    def describe(self) -> dict[str, Any]:
        """Plain summary for the run report (tier, precision, layers, version, package size)."""
        return {
            "tier": self.tier,
            "precision": self.precision,
            "layers": len(self.kept),
            "layer_map": self.kept,
            "version": self.version,
            "package_bytes": sum(f.size for f in self.manifest.files),
            "blob_id": self.manifest.blob_id,
        }


@dataclass(frozen=True)
class TierSet:
    """The prepared tiers of one model in one folder (see the module docstring).

    Attributes:
        root: The folder holding :data:`RECORD_FILE` and ``tiers/``.
        method: The method that built them.
        num_layers: Layers of the full LLM.
        layers_prefix: Dotted path of its decoder layer list.
        fingerprint: :func:`model_fingerprint` of the full LLM they were cut from.
        ranking: SGP blocks in pruning order (empty when the method ranks nothing).
        tiers: Tier name -> prepared tier, shallowest first.
        spec: The :class:`TierSpec` they were built with, as plain types.
        oda: Tier name -> summary of its latest alignment (absent when never aligned).
        source: The folder they were first built in, when adopted from elsewhere ("" if here).
    """

    root: Path
    method: str
    num_layers: int
    layers_prefix: str
    fingerprint: str
    ranking: list[list[int]]
    tiers: dict[str, PreparedTier]
    spec: dict[str, Any]
    oda: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""

    def layer_maps(self) -> dict[str, list[int]]:
        """Package name -> layer map."""
        return {name: list(t.kept) for name, t in self.tiers.items()}

    def packages_by_tier(self) -> dict[str, list[PreparedTier]]:
        """Tier name -> its packages (primary precision first), shallowest tier first."""
        grouped: dict[str, list[PreparedTier]] = {}
        for package in sorted(self.tiers.values(), key=lambda t: (len(t.kept), t.name != t.tier, t.name)):
            grouped.setdefault(package.tier, []).append(package)
        return grouped

    def aligned_path(self, tier: str, version: int) -> Path:
        """File of the tensors alignment changed in version ``version`` of tier ``tier``."""
        return self.root / TIERS_FOLDER / tier / f"aligned_v{version}.safetensors"

    def aligned_student(self, full_model: nn.Module, name: str) -> nn.Module:
        """The sub-LLM of package (or tier) ``name`` at its current version, aligned weights
        loaded, in the full model's dtype.

        Re-alignment and extra precisions start from this rather than from the 4-bit package,
        so quantization error never accumulates across versions.
        """
        from safetensors.torch import load_file

        tier = self.tiers[name]
        student = build_submodel(full_model, tier.kept)
        path = self.aligned_path(tier.tier, tier.version)
        if path.is_file():
            student.load_state_dict(load_file(str(path)), strict=False)
        return student

    def save(self) -> None:
        """Write the record (atomically: a crash leaves the old one or the new one)."""
        record = {
            "format": RECORD_FORMAT,
            "method": self.method,
            "num_layers": self.num_layers,
            "layers_prefix": self.layers_prefix,
            "fingerprint": self.fingerprint,
            "ranking": self.ranking,
            "tiers": {t.name: {"kept": t.kept, "version": t.version, "precision": t.precision} for t in self.tiers.values()},
            "spec": self.spec,
            "oda": self.oda,
            "source": self.source,
        }
        path = self.root / RECORD_FILE
        staging = path.with_suffix(".json.tmp")
        staging.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(staging, path)


def model_fingerprint(model: nn.Module) -> str:
    """A short hash that tells checkpoints apart: architecture, sizes, first embedding values.

    The values are hashed in bf16, so the same checkpoint loaded in fp32 or bf16 agrees.

    Args:
        model: A causal LM.

    Returns:
        16 hex characters.
    """
    config = text_config(model)
    digest = hashlib.sha256()
    for key in ("model_type", "num_hidden_layers", "hidden_size", "vocab_size"):
        digest.update(f"{key}={getattr(config, key, None)};".encode())
    embedding = model.get_input_embeddings().weight.detach().reshape(-1)[:_FINGERPRINT_VALUES]
    digest.update(embedding.to(device="cpu", dtype=torch.bfloat16).view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def tier_from_folder(name: str, kept: list[int], version: int, folder: Path, model_name: str) -> PreparedTier:
    """The published package of a package folder (its precision read from the package's meta):
    its manifest carries that meta and the sub-LLM's model config, because clients plan memory
    from the manifest before downloading."""
    package_meta = read_meta(folder)
    meta = dataclasses.asdict(package_meta)
    meta["model_config"] = json.loads((folder / "config.json").read_text())
    manifest = build_manifest(folder, name=model_name, version=version, tier=name, meta=meta)
    return PreparedTier(
        name=name, kept=list(kept), version=version, folder=folder, manifest=manifest, precision=package_meta.precision
    )


def load_tiers(root: str | Path) -> TierSet:
    """Read the tiers recorded in ``root`` (a run directory or a ``prune`` output).

    Raises:
        RunStateError: No record, a record of another format, or a package it names is missing.
    """
    root = Path(root)
    path = root / RECORD_FILE
    if not path.is_file():
        raise RunStateError(f"{path} is missing: no tiers were prepared in {root}")
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunStateError(f"{path} is not valid JSON ({exc.msg})") from exc
    if record.get("format") != RECORD_FORMAT:
        raise RunStateError(f"{path} has record format {record.get('format')!r}; this fedsoda reads {RECORD_FORMAT}")
    spec = record["spec"]
    tiers = {}
    for name, tier in record["tiers"].items():
        folder = root / TIERS_FOLDER / name / f"v{tier['version']}"
        if not folder.is_dir():
            raise RunStateError(f"{path} names tier {name} v{tier['version']}, but {folder} is missing")
        tiers[name] = tier_from_folder(name, tier["kept"], tier["version"], folder, spec["model_name"])
    return TierSet(
        root=root, method=record["method"], num_layers=record["num_layers"], layers_prefix=record["layers_prefix"],
        fingerprint=record["fingerprint"], ranking=record["ranking"], tiers=tiers, spec=spec,
        oda=record.get("oda", {}), source=record.get("source", ""),
    )


def check_tiers_fit(tierset: TierSet, full_model: nn.Module, method: str) -> None:
    """Refuse tiers cut from another model, or built by another method than the run's.

    Raises:
        ConfigError: The fingerprint or the method differ (the message says which).
    """
    fingerprint = model_fingerprint(full_model)
    if tierset.fingerprint != fingerprint:
        raise ConfigError(
            f"the tiers in {tierset.root} were cut from another model (fingerprint {tierset.fingerprint}, "
            f"{tierset.num_layers} layers) than this run's ({fingerprint}, "
            f"{len(find_decoder_layers(full_model)[1])} layers): prune this model, or use its model"
        )
    if tierset.method != method:
        raise ConfigError(
            f"the tiers in {tierset.root} were built by method {tierset.method!r}; this run's method is {method!r}"
        )


def adopt_tiers(source: str | Path, root: str | Path, full_model: nn.Module, method: str) -> TierSet:
    """Take the tiers a ``prune`` run wrote in ``source`` as this run's, in ``root``.

    The files are hard-linked where the file system allows (copied otherwise), so the run
    directory is self-contained: later versions, ``--resume`` and deleting ``source`` work as
    for tiers built in the run.

    Args:
        source: A ``prune`` output folder (or any folder :func:`build_tiers` wrote).
        root: The run directory.
        full_model: The run's full LLM (checked against the tiers' fingerprint).
        method: The run's method (must be the one that built them).

    Returns:
        The tiers, now recorded in ``root``.

    Raises:
        RunStateError: ``source`` holds no tiers.
        ConfigError: They do not fit this model or method.
    """
    source, root = Path(source).resolve(), Path(root)
    found = load_tiers(source)
    check_tiers_fit(found, full_model, method)
    if source == root.resolve():
        return found
    target = root / TIERS_FOLDER
    if target.exists():
        shutil.rmtree(target)  # the run directory held tiers of an earlier start: these replace them
    shutil.copytree(source / TIERS_FOLDER, target, copy_function=_link_or_copy)
    tiers = {
        name: tier_from_folder(name, t.kept, t.version, target / name / f"v{t.version}", found.spec["model_name"])
        for name, t in found.tiers.items()
    }
    adopted = dataclasses.replace(found, root=root, tiers=tiers, source=found.source or str(source))
    adopted.save()
    return adopted


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed: a copy costs only disk
        shutil.copy2(src, dst)
    return dst


