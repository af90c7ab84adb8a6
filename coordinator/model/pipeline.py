"""The coordinator's model side of one run: its full LLM and tiers, the adapters, the end.

:class:`ModelPipeline` is what the run side (:mod:`coordinator.run.server`) calls, through its
``ModelSide`` protocol: the published tiers, the initial adapter, a client's tier, the shapes
its updates must have, re-alignment, and the export and evaluation of the final adapter. The
tiers themselves come from the tier builder (:mod:`coordinator.model.tiers`): built in the run
directory, adopted from a ``prune`` output (``pruning.tiers_dir``), or reloaded on resume.
What each method does is data (:mod:`coordinator.model.methods`); nothing here branches on it.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from coordinator.model import evaluation, surgery
from coordinator.model.datasets import public_text, task_prompts, task_split
from coordinator.model.export import export_adapter
from coordinator.model.footprint import CoordinatorWorkload
from coordinator.model.methods import Method, get_method
from coordinator.model.models import load_model, resolve_model
from coordinator.model.oda import ODAConfig
from coordinator.model.placement import Placement, resolve_placement
from coordinator.model.plugged_adapter import plugged_adapter
from coordinator.model.preflight import preflight
from coordinator.model.progress import ProgressSink
from coordinator.model.task_eval import EvalSettings, compare, score_task
from coordinator.model.tiers import (
    FullModel,
    TierSpec,
    add_precisions,
    build_tiers,
    realign_tiers,
)
from coordinator.model.tierset import (
    PreparedTier,
    TierSet,
    adopt_tiers,
    check_tiers_fit,
    load_tiers,
)
from coordinator.model.update_forms import (
    coordinate_shapes,
    lora_view,
    round_training,
    target_matrices,
)
from coordinator.settings import AlignmentSettings, RunConfig
from hardware_profiles.assignment import PublishedPackage, assign_tier
from hardware_profiles.shape import model_shape
from shared.adapters import LoraSettings, to_sub_keys
from shared.errors import ConfigError, ModelError
from shared.protocol import Assignment, DeviceProfile, TrainingParams
from shared.rows import read_rows
from shared.subllm import load_package
from shared.tasks import Example

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Receives one-line status messages for the long steps."""


class MessageSink:
    """A :class:`~coordinator.model.progress.ProgressSink` that passes each step's start to a
    one-line ``progress`` callback (what ``serve`` prints)."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress

    def start(self, description: str, total: int) -> Callable[[int], None]:
        """See :meth:`ProgressSink.start`."""
        self._progress(description)
        return lambda n: None


def oda_config(alignment: AlignmentSettings, steps: int, align_layers: str, seed: int) -> ODAConfig:
    """The ODA settings of a run's pre-alignment or re-alignment.

    Args:
        alignment: The run's alignment settings.
        steps: Optimiser steps.
        align_layers: ``bridge`` or ``all``.
        seed: The run's seed.
    """
    return ODAConfig(
        steps=steps,
        learning_rate=alignment.learning_rate,
        alpha=alignment.alpha,
        beta=alignment.beta,
        temperature=alignment.temperature,
        align_layers=align_layers,  # type: ignore[arg-type]
        seed=seed,
        kl_chunk_tokens=alignment.chunk_tokens,
    )


def tier_spec(config: RunConfig) -> TierSpec:
    """The tiers a run config asks for."""
    pruning, alignment = config.pruning, config.alignment
    return TierSpec(
        method=config.method,
        depths=tuple(pruning.depths),
        block_size=pruning.block_size,
        keep_head=pruning.keep_head,
        keep_tail=pruning.keep_tail,
        token=pruning.token,
        precision=pruning.precision,
        pre_align=oda_config(alignment, alignment.pre_align_steps, alignment.align_layers, config.seed),
        model_name=str(config.model.model),
    )


def run_workload(config: RunConfig, num_layers: int, placement: Placement) -> CoordinatorWorkload:
    """What a run asks of the coordinator's memory: its tiers, alignment and calibration batches."""
    alignment, pruning = config.alignment, config.pruning
    return CoordinatorWorkload(
        dtype=placement.dtype, device=placement.device,  # type: ignore[arg-type]
        calibration_batch_size=alignment.batch_size, seq_len=config.model.calibration_seq_len,
        depths=tier_spec(config).resolved_depths(num_layers), block_size=pruning.block_size,
        align_layers="all" if "all" in (alignment.align_layers, alignment.realign_layers) else "bridge",
        oda_steps=max(alignment.pre_align_steps, alignment.realign_steps), precision=pruning.precision,  # type: ignore[arg-type]
        num_layers=num_layers, evaluate=False, kl_chunk_tokens=alignment.chunk_tokens,
    )


class ModelPipeline:
    """Full LLM + sub-LLM tiers of one run (see the module docstring).

    Build it with :meth:`prepare`; the server then calls :meth:`initial_adapter`,
    :meth:`assign`, :meth:`expected_shapes`, :meth:`realign` and :meth:`finish`.
    """

    def __init__(self, config: RunConfig, run_dir: Path, progress: Progress) -> None:
        self.config = config
        self.method: Method = get_method(config.method)
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.placement = resolve_placement(config.model.device, config.model.dtype)
        source = resolve_model(config.model.model)
        preflight(source, run_workload(config, model_shape(source).num_layers, self.placement), progress)
        self.full_model, self.tokenizer = load_model(source, self.placement)
        self.layers_prefix, layers = surgery.find_decoder_layers(self.full_model)
        self.num_layers = len(layers)
        self.lora = LoraSettings.from_training(config.training)
        self.task = config.task.spec()
        self._test: list[Example] | None = None
        self.tierset: TierSet | None = None
        self._calibration: list[dict[str, torch.Tensor]] | None = None
        self._shapes: dict[str, dict[str, tuple[int, ...]]] | None = None
        self._initial: dict[str, torch.Tensor] | None = None
        self._matrices: dict[str, tuple[int, int]] | None = None

    # ------------------------------------------------------------------ preparation

    @classmethod
    def prepare(cls, config: RunConfig, run_dir: Path, *, resume: bool = False, progress: Progress = lambda _m: None) -> ModelPipeline:
        """Load the full model and build, adopt or (on resume) reload the run's tiers.

        Args:
            config: Run configuration.
            run_dir: Run directory.
            resume: Reuse the tiers recorded in ``run_dir`` instead of preparing them.
            progress: Receives one-line status messages for the long steps.

        Returns:
            The ready pipeline.

        Raises:
            RunStateError: ``resume`` on a run directory that was never prepared.
            ConfigError: Tiers (recorded or adopted) of another model or method.
        """
        pipeline = cls(config, run_dir, progress)
        if resume:
            pipeline.tierset = load_tiers(pipeline.run_dir)
            check_tiers_fit(pipeline.tierset, pipeline.full_model, config.method)
        elif config.pruning.tiers_dir:
            pipeline.tierset = adopt_tiers(config.pruning.tiers_dir, pipeline.run_dir, pipeline.full_model, config.method)
            built = pipeline.tierset.spec
            progress(
                f"reusing the {config.method} tiers prepared in {config.pruning.tiers_dir} "
                f"({', '.join(pipeline.tierset.tiers)}; blocks of {built['block_size']}, {built['precision']}): "
                "no SGP, no pre-alignment"
            )
        else:
            pipeline.tierset = build_tiers(pipeline._full(), tier_spec(config), pipeline.run_dir, sink=pipeline._sink())
        pipeline._publish_extra_precisions()
        return pipeline

    def _publish_extra_precisions(self) -> None:
        """Package every tier also in ``pruning.extra_precisions`` where it is not yet (built
        tiers, an adopted ``prune`` output, a resumed run whose config asks for more)."""
        assert self.tierset is not None
        wanted = [p for p in self.config.pruning.extra_precisions if p != self.tierset.spec["precision"]]
        have = {(t.tier, t.precision) for t in self.tiers.values()}
        if all((tier, p) in have for tier in self.tierset.packages_by_tier() for p in wanted):
            return
        self.progress(f"packaging every tier also in {', '.join(wanted)} (pruning.extra_precisions)")
        self.tierset = add_precisions(self.tierset, self._full(), wanted, sink=self._sink())

    @property
    def tiers(self) -> dict[str, PreparedTier]:
        """The published tiers, by name."""
        assert self.tierset is not None, "prepare() first"
        return self.tierset.tiers

    def _sink(self) -> ProgressSink:
        return MessageSink(self.progress)

    def _full(self) -> FullModel:
        return FullModel(self.full_model, self.tokenizer, self.calibration_batches())

    def calibration_batches(self) -> list[dict[str, torch.Tensor]]:
        """Tokenized public-text batches for SGP and ODA (built once)."""
        if self._calibration is None:
            settings = self.config.model
            texts = public_text(settings.public_data, n=settings.calibration_samples)
            if settings.task_calibration:
                texts += task_prompts(
                    settings.task_calibration, self.task, self.tokenizer,
                    settings.task_calibration_samples, settings.calibration_seq_len,
                )
                # Mix the two kinds so every distillation batch sees both.
                random.Random(self.config.seed).shuffle(texts)
            self._calibration = evaluation.tokenize_texts(
                self.tokenizer, texts, max_length=settings.calibration_seq_len, batch_size=self.config.alignment.batch_size
            )
        return self._calibration

    # ------------------------------------------------------------------ adapters

    def initial_adapter(self) -> dict[str, torch.Tensor]:
        """The round-0 global adapter: PEFT's own init on the full model, canonical keys.

        Every layer the method adapts in any tier (with ``every_kept_layer``: every layer a tier
        keeps) gets LoRA A (PEFT's Kaiming init, seeded) and B = 0, so the adapted model starts
        equal to the base model and all clients start alike. FedKRSO starts from no
        coordinates at all (the base model).

        Returns:
            Canonical full-LLM key -> fp32 tensor.
        """
        if self.method.update_form == "subspace":
            return {}
        if self._initial is not None:
            return {k: v.clone() for k, v in self._initial.items()}
        from peft import get_peft_model, get_peft_model_state_dict

        layers = sorted({i for t in self.tiers.values() for i in self.method.adapted_layers(t.kept)})
        torch.manual_seed(self.config.seed)
        shell = surgery.build_submodel(self.full_model, list(range(self.num_layers)))
        peft_model = get_peft_model(shell, self.lora.peft_config(layers=layers, layers_prefix=self.layers_prefix))
        state = get_peft_model_state_dict(peft_model)
        # Built once: it deep-copies the whole model, and expected_shapes needs it too. Adapters
        # live on the CPU in fp32 whatever the model's device and dtype (they travel and are averaged there).
        self._initial = {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}
        del peft_model, shell
        return {k: v.clone() for k, v in self._initial.items()}

    def matrices(self) -> dict[str, tuple[int, int]]:
        """The full model's target weight matrices, module key -> ``(d_out, d_in)``."""
        if self._matrices is None:
            self._matrices = target_matrices(self.full_model, self.config.training.target_modules)
        return self._matrices

    def round_training(self, round_num: int) -> TrainingParams:
        """The training parameters of round ``round_num`` (FedKRSO: with the round's seeds)."""
        c = self.config
        return round_training(self.method, c.training, c.subspace, c.seed, round_num)

    def lora_view(self, global_state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], LoraSettings]:
        """The global state as a LoRA adapter and its settings (FedKRSO: stacked projections)."""
        return lora_view(self.method, global_state, self.lora, self.matrices())

    def expected_shapes(self, round_num: int) -> dict[str, dict[str, tuple[int, ...]]]:
        """For each tier, the adapter keys (canonical) and shapes its clients must send in
        round ``round_num`` (LoRA: the same every round; FedKRSO: that round's seeds)."""
        if self.method.update_form == "subspace":
            training = self.round_training(round_num)
            return {
                name: coordinate_shapes(self.matrices(), self.method.adapted_layers(t.kept), self.layers_prefix, training)
                for name, t in self.tiers.items()
            }
        if self._shapes is None:
            from shared.adapters import layer_index

            full = {k: tuple(v.shape) for k, v in self.initial_adapter().items()}
            self._shapes = {
                name: {k: s for k, s in full.items() if layer_index(k, self.layers_prefix) in set(self.method.adapted_layers(t.kept))}
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
        assert self.tierset is not None
        return assign_tier(
            client_id,
            profile,
            self.full_model.config,
            {name: PublishedPackage(tuple(t.kept), t.precision) for name, t in self.tiers.items()},  # type: ignore[arg-type]
            self.config.training,
        )

    def realign(self, global_state: dict[str, torch.Tensor], version: int) -> dict[str, PreparedTier]:
        """Re-align every tier with the global adapter plugged in; publish as ``version``.

        Only a method that re-aligns does; the others keep their tiers (and version).

        Args:
            global_state: Current global adapter (canonical keys).
            version: New package version.

        Returns:
            The (new) tiers.
        """
        if not self.method.realigns:
            return self.tiers
        assert self.tierset is not None
        alignment = self.config.alignment
        realign = oda_config(alignment, alignment.realign_steps, alignment.realign_layers, self.config.seed)
        self.tierset = realign_tiers(self.tierset, self._full(), global_state, self.lora, realign, version, sink=self._sink())
        return self.tiers

    # ------------------------------------------------------------------ the end

    def finish(self, global_state: dict[str, torch.Tensor], run_dir: Path) -> dict[str, Any]:
        """Export the global adapter for the full model and evaluate it on the task.

        Args:
            global_state: Final global adapter (canonical keys).
            run_dir: Where ``adapter/`` and ``evaluation.json`` go.

        Returns:
            ``adapter_dir`` and, unless evaluation is off, ``evaluation``: the task, the metric
            of the full LLM before and after loading the adapter (each with its confidence
            interval), their paired difference, and each tier's sub-LLM with the adapter.
        """
        adapter_dir = Path(run_dir) / "adapter"
        self.progress(f"exporting the global adapter for the full model to {adapter_dir}")
        state, settings = self.lora_view(global_state)
        export_adapter(state, self.full_model, adapter_dir, settings)
        results: dict[str, Any] = {"adapter_dir": str(adapter_dir)}
        if self.config.evaluation.enabled:
            results["evaluation"] = self.evaluate(adapter_dir, global_state)
        (Path(run_dir) / "evaluation.json").write_text(json.dumps(results, indent=2))
        return results

    def test_examples(self) -> list[Example]:
        """The task's test examples: ``evaluation.test_data`` or the preset's fixed test split
        (the first ``test_samples`` of them), built once.

        Raises:
            ConfigError: No test data given and the task has no preset to take it from.
            DataError: A test row that does not fit the task (named by file and line).
        """
        if self._test is None:
            settings = self.config.evaluation
            if settings.test_data:
                rows, source = read_rows(settings.test_data), settings.test_data
            elif self.config.task.preset:
                _, test = task_split(self.config.task.preset, seed=settings.split_seed)
                rows, source = list(enumerate(test, start=1)), f"the {self.config.task.preset} test split"
            else:
                raise ConfigError("evaluation needs test data: set evaluation.test_data to a file, or use a task preset")
            if settings.test_samples:
                rows = rows[: settings.test_samples]
            self._test = self.task.examples(rows, source)
        return self._test

    def _eval_settings(self) -> EvalSettings:
        e = self.config.evaluation
        return EvalSettings(max_length=e.max_length, batch_size=e.batch_size, confidence=e.confidence)

    def evaluate(self, adapter_dir: Path, global_state: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The full LLM before and after loading the exported adapter with PEFT, and each
        tier's sub-LLM (its package, as clients load it) with the adapter, on the test examples.

        Args:
            adapter_dir: The exported PEFT adapter folder for the full model.
            global_state: The same adapter in canonical keys (for the tiers).

        Returns:
            Plain types: ``task``, ``kind``, ``metric``, ``test_examples``, ``before``,
            ``after``, ``difference`` (after - before, paired), ``tiers``.
        """
        from peft import PeftModel

        examples, settings = self.test_examples(), self._eval_settings()
        self.progress(f"evaluating the full model on {len(examples)} {self.task.name} test examples ({self.task.metric})")
        before = score_task(self.full_model, self.tokenizer, self.task, examples, settings)
        # PEFT wraps the model it is given in place; unload() takes the LoRA modules out again
        # (without merging), so the full model is evaluated with the exported files and no
        # second copy of its weights is ever made.
        adapted = PeftModel.from_pretrained(self.full_model, str(adapter_dir))
        try:
            after = score_task(adapted, self.tokenizer, self.task, examples, settings)
        finally:
            self.full_model = adapted.unload()
        out: dict[str, Any] = {
            "task": self.task.name, "kind": self.task.kind, "metric": self.task.metric, "test_examples": len(examples),
            "before": before.to_dict(), "after": after.to_dict(),
            "difference": compare(after, before, settings.confidence).to_dict(), "tiers": {},
        }
        if self.config.evaluation.tiers:
            for name, tier in self.tiers.items():
                self.progress(f"evaluating tier {name} (its package) with the adapter")
                model, tokenizer = self._adapted_tier(tier, global_state)
                out["tiers"][name] = score_task(model, tokenizer, self.task, examples, settings).to_dict()
        return out

    def _adapted_tier(self, tier: PreparedTier, global_state: dict[str, torch.Tensor]) -> tuple[Any, Any]:
        """A tier's package with the adapter on every layer, as a client holds it after a round."""
        from peft import get_peft_model, set_peft_model_state_dict

        model, tokenizer, _ = load_package(tier.folder)
        state, settings = self.lora_view(global_state)
        peft_model = get_peft_model(model, settings.peft_config())
        sub = to_sub_keys(state, tier.kept, self.layers_prefix)
        unexpected = set_peft_model_state_dict(peft_model, sub).unexpected_keys
        if unexpected:
            raise ModelError(f"tier {tier.name}: the adapter has keys its sub-LLM lacks: {sorted(unexpected)[:3]}")
        return peft_model.eval(), tokenizer

    def evaluate_round(self, global_state: dict[str, torch.Tensor], round_: int) -> dict[str, Any]:
        """The full LLM with the round's global adapter on the first ``round_samples`` test
        examples (the per-round curve). The adapter's dense update is added to the weights for
        the call and taken out bit-exactly afterwards.

        Args:
            global_state: The global adapter after ``round_``.
            round_: The round.

        Returns:
            ``round`` and the metric with its confidence interval.
        """
        examples = self.test_examples()[: self.config.evaluation.round_samples]
        self.progress(f"round {round_}: evaluating the global adapter on {len(examples)} test examples")
        state, settings = self.lora_view(global_state)
        with plugged_adapter(self.full_model, state, settings):
            score = score_task(self.full_model, self.tokenizer, self.task, examples, self._eval_settings())
        return {"round": round_, **score.to_dict()}
