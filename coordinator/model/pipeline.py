"""The coordinator's model side for one run: tiers, initial adapter, re-alignment, export.

:class:`ModelPipeline` holds the full LLM and turns it into the sub-LLM tiers the run's
strategy calls for:

* ``fedsoda``: SGP ranks layer blocks on public text; tier ``p`` prunes the first ``p``
  ranked blocks (tiers nest); ODA pre-aligns each tier to the full LLM and re-aligns it
  every r rounds with the global adapter plugged in.
* ``fedot``: uniform layer drop to the same depth (first and last 2 layers kept), one
  distillation over all layers, no re-alignment.
* ``fedpetuning``: one tier holding the whole model (no pruning, no distillation).

Each tier is written as a self-describing package (one file per layer, named by full-LLM
index) in ``run_dir/tiers/<tier>/v<version>/`` and published as a content-addressed
manifest, so a re-aligned version costs clients only the layers that changed. Everything
needed to resume (ranking, tier layer maps, versions) is read back from that folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coordinator.model import evaluation, sgp, surgery
from coordinator.model.datasets import (
    movie_reviews,
    public_text,
    task_prompts,
    train_test_split,
)
from coordinator.model.export import export_adapter
from coordinator.model.models import load_model
from coordinator.model.oda import ODAConfig, distill
from coordinator.model.packaging import write_package
from coordinator.settings import RunConfig
from hardware_profiles.planner import assign_tier
from shared.adapters import LoraSettings
from shared.errors import ConfigError, RunStateError
from shared.layermap import kept_layers, uniform_drop_layers
from shared.manifests import build_manifest
from shared.protocol import Assignment, DeviceProfile, Manifest
from shared.subllm import read_meta
from shared.tasks import ClassificationTask, accuracy, score_label_words

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
PIPELINE_FILE = "pipeline.json"


@dataclass(frozen=True)
class PreparedTier:
    """One sub-LLM tier as published.

    Attributes:
        name: Tier name, ``L<kept layers>`` (e.g. ``L18``).
        kept: Full-LLM indices of its layers (its layer map).
        version: Package version (1, then +1 per re-alignment).
        folder: Package folder.
        manifest: Its content-addressed manifest.
    """

    name: str
    kept: list[int]
    version: int
    folder: Path
    manifest: Manifest

    def describe(self) -> dict[str, Any]:
        """Plain summary for the run report (layers, version, package size)."""
        return {
            "layers": len(self.kept),
            "layer_map": self.kept,
            "version": self.version,
            "package_bytes": sum(f.size for f in self.manifest.files),
            "blob_id": self.manifest.blob_id,
        }


class ModelPipeline:
    """Full LLM + sub-LLM tiers of one run (see the module docstring).

    Build it with :meth:`prepare`; the server then calls :meth:`initial_adapter`,
    :meth:`assign`, :meth:`expected_shapes`, :meth:`realign` and :meth:`finish`.
    """

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.full_model, self.tokenizer = load_model(config.model.model)
        self.layers_prefix, layers = surgery.find_decoder_layers(self.full_model)
        self.num_layers = len(layers)
        self.lora = LoraSettings(
            rank=config.training.lora_rank,
            alpha=config.training.lora_alpha,
            dropout=config.training.lora_dropout,
            target_modules=tuple(config.training.target_modules),
        )
        self.ranking: list[list[int]] = []
        self.tiers: dict[str, PreparedTier] = {}
        self._calibration: list[dict[str, torch.Tensor]] | None = None
        self._shapes: dict[str, dict[str, tuple[int, ...]]] | None = None
        self._initial: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ preparation

    @classmethod
    def prepare(cls, config: RunConfig, run_dir: Path, *, resume: bool = False, progress: Progress = lambda _m: None) -> ModelPipeline:
        """Load the full model and build (or, on resume, reload) the run's tiers.

        Args:
            config: Run configuration.
            run_dir: Run directory.
            resume: Reuse the tiers recorded in ``run_dir`` instead of rebuilding them.
            progress: Receives one-line status messages for the long steps.

        Returns:
            The ready pipeline.
        """
        pipeline = cls(config, run_dir, progress)
        record = pipeline.run_dir / PIPELINE_FILE
        if resume:
            if not record.is_file():
                raise RunStateError(f"{record} is missing: {run_dir} was never prepared, start without --resume")
            pipeline._reload(json.loads(record.read_text()))
        else:
            pipeline._build()
            pipeline._save_record()
        return pipeline

    def _layer_maps(self) -> dict[str, list[int]]:
        strategy, L = self.config.pruning.strategy, self.num_layers
        if strategy == "fedpetuning":
            return {f"L{L}": list(range(L))}
        maps = {}
        n = self.config.pruning.block_size
        for pruned in sorted(self.config.pruning.tiers):
            if pruned >= L - 1:
                raise ConfigError(f"pruning.tiers entry {pruned} leaves no layer of {L}")
            if strategy == "fedsoda":
                kept = kept_layers(L, self.ranking, pruned // n)
            else:  # fedot
                kept = uniform_drop_layers(L, L - pruned)
            maps[f"L{len(kept)}"] = kept
        return maps

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """Tokenized public-text batches for SGP and ODA (built once)."""
        if self._calibration is None:
            settings = self.config.model
            texts = public_text(settings.public_data, n=settings.calibration_samples)
            if settings.task_calibration:
                texts += task_prompts(
                    settings.task_calibration, ClassificationTask.from_label_words(), self.tokenizer,
                    settings.task_calibration_samples, settings.calibration_seq_len,
                )
                # Mix the two kinds so every distillation batch sees both.
                random.Random(self.config.seed).shuffle(texts)
            self._calibration = evaluation.tokenize_texts(
                self.tokenizer, texts, max_length=settings.calibration_seq_len, batch_size=self.config.alignment.batch_size
            )
        return self._calibration

    def _build(self) -> None:
        strategy = self.config.pruning.strategy
        if strategy == "fedsoda":
            self.progress(f"SGP: measuring block distances of {self.num_layers} layers on public text")
            distances = sgp.compute_block_distances(
                self.full_model, self.calibration_batches(), max_block=self.config.pruning.block_size
            )
            self.ranking = sgp.rank_blocks(
                distances, self.config.pruning.block_size, self.config.pruning.keep_head, self.config.pruning.keep_tail
            )
        for name, kept in self._layer_maps().items():
            student = surgery.build_submodel(self.full_model, kept)
            if strategy != "fedpetuning" and self.config.alignment.pre_align_steps > 0:
                self.progress(f"ODA: aligning tier {name} ({len(kept)} layers) to the full model")
                stats = distill(
                    self.full_model,
                    student,
                    kept,
                    self.calibration_batches(),
                    self._oda_config(self.config.alignment.pre_align_steps),
                )
                log.info("tier %s: distillation loss %.4f -> %.4f", name, stats.first_loss, stats.last_loss)
            self._save_aligned(name, 1, kept, student)
            self.tiers[name] = self._package(name, kept, 1, student)

    def _oda_config(self, steps: int, *, realign: bool = False) -> ODAConfig:
        a = self.config.alignment
        # FedOT distils every layer once; FedSODA trains the bridge layers by default. A
        # re-alignment has its own choice: every layer it trains is a chunk clients download again.
        layers = "all" if self.config.pruning.strategy == "fedot" else (a.realign_layers if realign else a.align_layers)
        return ODAConfig(
            steps=steps,
            learning_rate=a.learning_rate,
            alpha=a.alpha,
            beta=a.beta,
            temperature=a.temperature,
            align_layers=layers,
            seed=self.config.seed,
        )

    def _package(self, name: str, kept: list[int], version: int, student: torch.nn.Module) -> PreparedTier:
        folder = self.run_dir / "tiers" / name / f"v{version}"
        self.progress(f"packaging tier {name} v{version} ({self.config.pruning.precision})")
        write_package(
            student, self.tokenizer, kept, name, version, folder,
            precision=self.config.pruning.precision, name=str(self.config.model.model), full_num_layers=self.num_layers,
        )
        return self._tier_from_folder(name, kept, version, folder)

    def _tier_from_folder(self, name: str, kept: list[int], version: int, folder: Path) -> PreparedTier:
        # Clients plan memory from the manifest before downloading, so it carries the
        # package's meta and the sub-LLM's model config.
        meta = dataclasses.asdict(read_meta(folder))
        meta["model_config"] = json.loads((folder / "config.json").read_text())
        manifest = build_manifest(folder, name=str(self.config.model.model), version=version, tier=name, meta=meta)
        return PreparedTier(name=name, kept=kept, version=version, folder=folder, manifest=manifest)

    def _save_record(self) -> None:
        record = {
            "strategy": self.config.pruning.strategy,
            "num_layers": self.num_layers,
            "layers_prefix": self.layers_prefix,
            "ranking": self.ranking,
            "tiers": {t.name: {"kept": t.kept, "version": t.version} for t in self.tiers.values()},
        }
        (self.run_dir / PIPELINE_FILE).write_text(json.dumps(record, indent=2))

    def _reload(self, record: dict[str, Any]) -> None:
        if record["num_layers"] != self.num_layers or record["strategy"] != self.config.pruning.strategy:
            raise RunStateError(
                f"{self.run_dir} was prepared for a {record['num_layers']}-layer model with strategy "
                f"{record['strategy']!r}; this config has {self.num_layers} layers and {self.config.pruning.strategy!r}"
            )
        self.ranking = record["ranking"]
        for name, tier in record["tiers"].items():
            folder = self.run_dir / "tiers" / name / f"v{tier['version']}"
            self.tiers[name] = self._tier_from_folder(name, tier["kept"], tier["version"], folder)

    # ------------------------------------------------------------------ adapters

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The round-0 global adapter: PEFT's own init on the full model, canonical keys.

        Every layer any tier holds gets LoRA A (PEFT's Kaiming init, seeded) and B = 0, so
        the adapted model starts equal to the base model and all clients start alike.

        Returns:
            Canonical full-LLM key -> fp32 tensor.
        """
        if self._initial is not None:
            return {k: v.clone() for k, v in self._initial.items()}
        from peft import get_peft_model, get_peft_model_state_dict

        layers = sorted({i for t in self.tiers.values() for i in t.kept})
        torch.manual_seed(self.config.seed)
        shell = surgery.build_submodel(self.full_model, list(range(self.num_layers)))
        peft_model = get_peft_model(shell, self.lora.peft_config(layers=layers, layers_prefix=self.layers_prefix))
        state = get_peft_model_state_dict(peft_model)
        # Built once: it deep-copies the whole model, and expected_shapes needs it too.
        self._initial = {k: v.detach().float().clone() for k, v in state.items()}
        return {k: v.clone() for k, v in self._initial.items()}

    def expected_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        """For each tier, the adapter keys (canonical) and shapes its clients must send."""
        if self._shapes is None:
            from shared.adapters import layer_index

            full = {k: tuple(v.shape) for k, v in self.initial_adapter().items()}
            self._shapes = {
                name: {k: s for k, s in full.items() if layer_index(k, self.layers_prefix) in set(t.kept)}
                for name, t in self.tiers.items()
            }
        return self._shapes

    # ------------------------------------------------------------------ rounds

    def assign(self, client_id: str, profile: DeviceProfile) -> Assignment:
        """Give a client the largest tier its hardware can train, or refuse with the reason.

        Args:
            client_id: The client.
            profile: Its measured hardware profile.

        Returns:
            The Assignment to send back.
        """
        return assign_tier(
            client_id,
            profile,
            self.full_model.config,
            {name: t.kept for name, t in self.tiers.items()},
            self.config.training,
            precision=self.config.pruning.precision,
        )

    def realign(self, global_state: dict[str, torch.Tensor], version: int) -> dict[str, PreparedTier]:
        """Re-align every tier with the global adapter plugged in; publish as ``version``.

        Only ``fedsoda`` re-aligns; other strategies keep their tiers (and version).

        Args:
            global_state: Current global adapter (canonical keys).
            version: New package version.

        Returns:
            The (new) tiers.
        """
        if self.config.pruning.strategy != "fedsoda":
            return self.tiers
        for name, tier in list(self.tiers.items()):
            self.progress(f"ODA: re-aligning tier {name} with the global adapter (v{version})")
            student = self._aligned_student(name, tier.kept, tier.version)
            distill(
                self.full_model,
                student,
                tier.kept,
                self.calibration_batches(),
                self._oda_config(self.config.alignment.realign_steps, realign=True),
                global_adapter=global_state,
                lora=self.lora,
            )
            self._save_aligned(name, version, tier.kept, student)
            self.tiers[name] = self._package(name, tier.kept, version, student)
        self._save_record()
        return self.tiers

    def _aligned_path(self, name: str, version: int) -> Path:
        return self.run_dir / "tiers" / name / f"aligned_v{version}.safetensors"

    def _save_aligned(self, name: str, version: int, kept: list[int], student: torch.nn.Module) -> None:
        """Keep the student's fp32 tensors that differ from the full model's (the aligned layers).

        Re-alignment starts from these rather than from the 4-bit package, so quantization
        error never accumulates across versions; a resumed run reads them back.
        """
        from safetensors.torch import save_file

        full = self.full_model.state_dict()
        prefix = self.layers_prefix + "."
        changed = {}
        for key, value in student.state_dict().items():
            ref_key = key
            if key.startswith(prefix):  # student layer i is full-model layer kept[i]
                index, _, rest = key[len(prefix):].partition(".")
                ref_key = f"{prefix}{kept[int(index)]}.{rest}"
            if ref_key not in full or not torch.equal(full[ref_key], value):
                changed[key] = value.detach().float().contiguous()
        path = self._aligned_path(name, version)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(changed, str(path))

    def _aligned_student(self, name: str, kept: list[int], version: int) -> torch.nn.Module:
        from safetensors.torch import load_file

        student = surgery.build_submodel(self.full_model, kept)
        path = self._aligned_path(name, version)
        if path.is_file():
            student.load_state_dict(load_file(str(path)), strict=False)
        return student

    # ------------------------------------------------------------------ the end

    def finish(self, global_state: dict[str, torch.Tensor], run_dir: Path) -> dict[str, Any]:
        """Export the global adapter for the full model and evaluate it.

        Args:
            global_state: Final global adapter (canonical keys).
            run_dir: Where ``adapter/`` and the evaluation go.

        Returns:
            ``adapter_dir`` and, when a task is configured, ``accuracy_before`` (full LLM
            alone) and ``accuracy_after`` (full LLM + adapter) on the test split.
        """
        adapter_dir = Path(run_dir) / "adapter"
        self.progress(f"exporting the global adapter for the full model to {adapter_dir}")
        export_adapter(global_state, self.full_model, adapter_dir, self.lora)
        results: dict[str, Any] = {"adapter_dir": str(adapter_dir)}
        if self.config.evaluation.task:
            results.update(self.evaluate(adapter_dir))
        (Path(run_dir) / "evaluation.json").write_text(json.dumps(results, indent=2))
        return results

    def evaluate(self, adapter_dir: Path) -> dict[str, Any]:
        """Accuracy of the full LLM before and after loading the adapter with PEFT.

        Args:
            adapter_dir: A PEFT adapter folder for the full model.

        Returns:
            ``task``, ``test_examples``, ``accuracy_before``, ``accuracy_after``.
        """
        from peft import PeftModel

        settings = self.config.evaluation
        _, test = train_test_split(movie_reviews(settings.task), seed=settings.split_seed)
        if settings.test_samples:
            test = test[: settings.test_samples]
        task = ClassificationTask.from_label_words()
        prompts = [task.prompt(row["text"]) for row in test]
        labels = [task.label_index(row["label"]) for row in test]
        self.progress(f"evaluating the full model on {len(test)} {settings.task} test examples")
        before = accuracy(score_label_words(self.full_model, self.tokenizer, prompts, task.words, max_length=settings.max_length), labels)
        # PEFT wraps the model it is given in place: hand it a copy so the base model stays clean.
        adapted = PeftModel.from_pretrained(surgery.build_submodel(self.full_model, list(range(self.num_layers))), str(adapter_dir))
        after = accuracy(score_label_words(adapted, self.tokenizer, prompts, task.words, max_length=settings.max_length), labels)
        return {"task": settings.task, "test_examples": len(test), "accuracy_before": before, "accuracy_after": after}
