"""ODA, orchestrated distillation alignment: pull the sub-LLM back towards the full LLM.

Student: the sub-LLM (its layer ``i`` was full-LLM layer ``kept[i]``). Teacher: the full
LLM, frozen. The loss on public text is :func:`coordinator.model.distillation_loss.distillation_loss`
(KL of the logits plus the mapped layers' hidden-state distance); this module is the training
loop around it: teacher under no-grad, trainable student layers with fp32 master weights and
gradient checkpointing, AdamW. By default only the *bridge* layers (the
kept layer right after each pruned gap, which now sees input that used to pass through
the removed layers) are trained; ``align_layers="all"`` trains every decoder layer.

Re-alignment plugs the current global adapter
(:func:`coordinator.model.plugged_adapter.plugged_adapter`) into both models first (teacher at full-LLM
indices, student at sub-LLM indices), frozen, and removes it from the student afterwards,
so the student's base weights absorb what the adapter changed. Layers that were not trained
come back bit-for-bit unchanged, so a re-aligned package shares their chunks.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from coordinator.model.distillation_loss import distillation_loss
from coordinator.model.evaluation import Batch, model_device
from coordinator.model.lm_head import (
    DEFAULT_CHUNK_TOKENS,
    TokenLogits,
    final_hidden,
)
from coordinator.model.plugged_adapter import plugged_adapter
from coordinator.model.surgery import capture_layer_io, find_decoder_layers
from shared.adapters import LoraSettings, to_sub_keys
from shared.errors import ConfigError, ModelError
from shared.layermap import bridge_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ODAConfig:
    """Distillation settings (defaults: what ``benchmarks/pruning.py`` found to work on SmolLM2).

    Attributes:
        steps: Optimiser steps (batches are cycled).
        learning_rate: AdamW learning rate.
        weight_decay: AdamW weight decay.
        alpha: Weight of the logit KL term.
        beta: Weight of the hidden-state alignment term.
        temperature: Softmax temperature tau of the KL term.
        align_layers: ``"bridge"`` (train only bridge layers) or ``"all"`` (every decoder layer).
        max_grad_norm: Gradient clipping norm (0 disables).
        seed: Seed of the dropout RNG during distillation.
        kl_chunk_tokens: Tokens whose logits exist at once in the KL term (memory, not results).
        gradient_checkpointing: Recompute each student layer's activations in backward
            instead of keeping them (memory for about a third more compute).
    """

    steps: int = 24
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    alpha: float = 1.0
    beta: float = 1.0
    temperature: float = 2.0
    align_layers: Literal["bridge", "all"] = "bridge"
    max_grad_norm: float = 1.0
    seed: int = 0
    kl_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    gradient_checkpointing: bool = True

    def __post_init__(self) -> None:
        if self.kl_chunk_tokens < 1:
            raise ConfigError(f"kl_chunk_tokens must be >= 1, got {self.kl_chunk_tokens}")
        if self.steps < 0:
            raise ConfigError(f"ODA steps must be >= 0, got {self.steps}")
        if self.temperature <= 0:
            raise ConfigError(f"ODA temperature must be > 0, got {self.temperature}")
        if self.align_layers not in ("bridge", "all"):
            raise ConfigError(f"align_layers must be 'bridge' or 'all', got {self.align_layers!r}")
        if self.alpha < 0 or self.beta < 0 or self.alpha + self.beta == 0:
            raise ConfigError("alpha and beta must be >= 0 and not both 0")


@dataclass(frozen=True)
class ODAStats:
    """What a distillation run did.

    Attributes:
        steps: Optimiser steps taken.
        trainable_layers: Sub-LLM layer indices that were trained.
        loss: Total loss per step (before each update).
        kl: KL term per step (unweighted, tau^2 included).
        hidden: Hidden-state term per step (unweighted).
    """

    steps: int
    trainable_layers: tuple[int, ...]
    loss: tuple[float, ...] = field(default=())
    kl: tuple[float, ...] = field(default=())
    hidden: tuple[float, ...] = field(default=())

    @property
    def first_loss(self) -> float:
        """Loss at the first step (nan when no step ran)."""
        return self.loss[0] if self.loss else math.nan

    @property
    def last_loss(self) -> float:
        """Loss at the last step (nan when no step ran)."""
        return self.loss[-1] if self.loss else math.nan

    def summary(self) -> dict[str, Any]:
        """Plain-type summary for reports: steps, trained layers, first/last and every loss."""
        return {
            "steps": self.steps,
            "trained_layers": list(self.trainable_layers),
            "first_loss": self.first_loss,
            "last_loss": self.last_loss,
            "loss": list(self.loss),
        }


def trainable_layer_indices(kept: Sequence[int], align_layers: str) -> list[int]:
    """Sub-LLM layers ODA trains: the bridge layers, or all of them.

    Args:
        kept: The layer map.
        align_layers: ``"bridge"`` or ``"all"``.

    Returns:
        Sub-LLM layer indices, ascending.
    """
    if align_layers == "all":
        return list(range(len(kept)))
    return bridge_layers(kept)


def distill(
    teacher: nn.Module,
    student: nn.Module,
    layer_map: Sequence[int],
    batches: Sequence[Batch],
    config: ODAConfig = ODAConfig(),
    *,
    global_adapter: Mapping[str, torch.Tensor] | None = None,
    lora: LoraSettings | None = None,
    progress: Callable[[int], None] | None = None,
) -> ODAStats:
    """Distil the full LLM into the sub-LLM in place (pre-alignment or re-alignment).

    Args:
        teacher: The full LLM (frozen; left unchanged).
        student: The sub-LLM built with ``layer_map``; its trainable layers are updated in place.
        layer_map: ``layer_map[i]`` is the full-LLM index of student layer ``i``.
        batches: Right-padded public-text batches, cycled for ``config.steps`` steps.
        config: Distillation settings.
        global_adapter: For re-alignment: the global adapter (canonical full-LLM PEFT keys),
            plugged into teacher and student for the duration and kept frozen.
        lora: The adapter's LoRA settings (needed with ``global_adapter``).
        progress: Called with 1 after each step.

    Returns:
        Per-step losses and the trained layers.

    Raises:
        ConfigError: A global adapter without LoRA settings, or no batches.
        ModelError: Teacher and student do not match the layer map.
    """
    if not batches:
        raise ConfigError("ODA needs at least one batch of public text")
    t_prefix, t_layers = find_decoder_layers(teacher)
    s_prefix, s_layers = find_decoder_layers(student)
    kept = [int(k) for k in layer_map]
    if len(s_layers) != len(kept) or max(kept) >= len(t_layers):
        raise ModelError(
            f"student has {len(s_layers)} layers and teacher {len(t_layers)}; they do not fit layer map {kept}"
        )
    if global_adapter is not None and lora is None:
        raise ConfigError("re-alignment with a global adapter needs its LoRA settings")
    train_idx = trainable_layer_indices(kept, config.align_layers)
    trainable = {f"{s_prefix}.{i}." for i in train_idx}

    with contextlib.ExitStack() as stack:
        if global_adapter is not None:
            assert lora is not None
            stack.enter_context(plugged_adapter(teacher, global_adapter, lora))
            sub_adapter = to_sub_keys(global_adapter, kept, t_prefix)
            # Trained student modules keep their update (the delta is subtracted back out);
            # frozen ones are restored bit-exactly so their package chunks do not change.
            stack.enter_context(
                plugged_adapter(
                    student, sub_adapter, lora, restore=lambda path: not any(path.startswith(p) for p in trainable)
                )
            )
        return _run_distillation(teacher, student, kept, batches, config, train_idx, progress)


class _MasterWeights:
    """The trainable parameters as the optimiser sees them: fp32, whatever the model's dtype.

    An fp32 parameter is its own master. A bf16 / fp16 one gets an fp32 copy that the
    optimiser updates and that is rounded back into the model after each step, so small
    updates accumulate instead of vanishing in a 7- or 10-bit mantissa.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.masters = [p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone()) for p in params]

    def take_grads(self) -> None:
        """Move each low-precision parameter's gradient onto its master, in fp32."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                m.grad = None if p.grad is None else p.grad.float()
                p.grad = None

    @torch.no_grad()
    def write_back(self) -> None:
        """Round the updated masters back into the model's parameters."""
        for p, m in zip(self.params, self.masters):
            if m is not p:
                p.copy_(m)


def _pair_loss(
    teacher: nn.Module,
    student: nn.Module,
    batch: Batch,
    kept: list[int],
    t_out: dict,
    s_out: dict,
    heads: tuple[TokenLogits, TokenLogits],
    config: ODAConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Teacher forward (no grad), student forward, and the ODA loss of one batch."""
    t_device, s_device = model_device(teacher), model_device(student)
    with torch.no_grad():
        t_final = final_hidden(teacher, batch["input_ids"].to(t_device), batch["attention_mask"].to(t_device))
        t_hidden = [t_out[k].to(s_device) for k in kept]
    mask = batch["attention_mask"].to(s_device)
    s_final = final_hidden(student, batch["input_ids"].to(s_device), mask)
    return distillation_loss(
        s_final, t_final.to(s_device), heads[1], heads[0], [s_out[i] for i in range(len(kept))], t_hidden, mask,
        temperature=config.temperature, alpha=config.alpha, beta=config.beta, kl_chunk_tokens=config.kl_chunk_tokens,
    )


def _run_distillation(
    teacher: nn.Module,
    student: nn.Module,
    kept: list[int],
    batches: Sequence[Batch],
    config: ODAConfig,
    train_idx: list[int],
    progress: Callable[[int], None] | None,
) -> ODAStats:
    _, s_layers = find_decoder_layers(student)
    previous_flags = {name: p.requires_grad for name, p in student.named_parameters()}
    params: list[nn.Parameter] = []
    for p in student.parameters():
        p.requires_grad_(False)
    for i in train_idx:
        for p in s_layers[i].parameters():
            p.requires_grad_(True)
            params.append(p)
    if not params:
        log.info("ODA: nothing to train (no bridge layers); skipped")
        for name, p in student.named_parameters():
            p.requires_grad_(previous_flags[name])
        return ODAStats(steps=0, trainable_layers=())
    masters = _MasterWeights(params)
    optimizer = torch.optim.AdamW(masters.masters, lr=config.learning_rate, weight_decay=config.weight_decay)
    heads = (TokenLogits(teacher), TokenLogits(student))
    teacher_was_training, student_was_training = teacher.training, student.training
    checkpointing = config.gradient_checkpointing and getattr(student, "supports_gradient_checkpointing", False)
    was_checkpointing = getattr(student, "is_activation_checkpointing", False)
    if checkpointing and not was_checkpointing:
        # Non-reentrant: frozen layers before the first trained one need no input gradient.
        student.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    teacher.eval()
    student.train()
    losses: list[float] = []
    kls: list[float] = []
    hiddens: list[float] = []
    try:
        # A private RNG stream: dropout is reproducible and the caller's RNG is untouched.
        with (
            torch.random.fork_rng(devices=[]),
            capture_layer_io(teacher, kept) as t_out,
            capture_layer_io(student) as s_out,
        ):
            torch.manual_seed(config.seed)
            for step, batch in zip(range(config.steps), itertools.cycle(batches)):
                total, kl, hidden = _pair_loss(teacher, student, batch, kept, t_out, s_out, heads, config)
                if not torch.isfinite(total):
                    raise ModelError(f"ODA loss became {float(total)} at step {step}; lower the learning rate")
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                masters.take_grads()
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(masters.masters, config.max_grad_norm)
                optimizer.step()
                masters.write_back()
                losses.append(float(total.detach()))
                kls.append(float(kl.detach()))
                hiddens.append(float(hidden.detach()))
                if step % 10 == 0:
                    log.debug("ODA step %d: loss %.4f (kl %.4f, hidden %.4f)", step, losses[-1], kls[-1], hiddens[-1])
                if progress is not None:
                    progress(1)
    finally:
        if checkpointing and not was_checkpointing:
            student.activation_checkpointing_disable()
        teacher.train(teacher_was_training)
        student.train(student_was_training)
        for name, p in student.named_parameters():
            p.requires_grad_(previous_flags[name])
            p.grad = None
    return ODAStats(
        steps=len(losses),
        trainable_layers=tuple(train_idx),
        loss=tuple(losses),
        kl=tuple(kls),
        hidden=tuple(hiddens),
    )


@torch.no_grad()
def evaluate_distillation_loss(
    teacher: nn.Module, student: nn.Module, layer_map: Sequence[int], batches: Sequence[Batch], config: ODAConfig
) -> float:
    """Mean ODA loss over batches without training (for before/after comparisons).

    Args:
        teacher: The full LLM.
        student: The sub-LLM.
        layer_map: The student's layer map.
        batches: Public-text batches.
        config: Supplies temperature and weights.

    Returns:
        The loss averaged over batches.
    """
    kept = [int(k) for k in layer_map]
    heads = (TokenLogits(teacher), TokenLogits(student))
    modes = teacher.training, student.training
    teacher.eval()
    student.eval()
    values = []
    try:
        with capture_layer_io(teacher, kept) as t_out, capture_layer_io(student) as s_out:
            for batch in batches:
                total, _, _ = _pair_loss(teacher, student, batch, kept, t_out, s_out, heads, config)
                values.append(float(total))
    finally:
        teacher.train(modes[0])
        student.train(modes[1])
    return sum(values) / len(values)
