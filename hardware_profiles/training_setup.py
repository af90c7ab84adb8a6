"""One LoRA training run as the estimator, the FLOP count and the planner see it.

:class:`TrainingSetup` holds, and checks, every choice that changes peak memory or step time:
layers kept, weight precision, LoRA rank / targets / dropout, batch, sequence length,
optimizer, checkpointing, device. :func:`wrapped_linears` and :func:`lora_param_count` say
which linears of a model LoRA wraps (PEFT's name matching) and how many parameters that trains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from hardware_profiles.shape import LinearShape, ModelShape
from shared.errors import ConfigError

Precision = Literal["nf4", "int8", "bf16", "fp16", "fp32"]
ComputeDtype = Literal["fp32", "bf16", "fp16"]
Optimizer = Literal["adamw", "adamw8bit", "sgd"]
Device = Literal["cpu", "cuda"]

PRECISIONS: tuple[Precision, ...] = ("nf4", "int8", "bf16", "fp16", "fp32")
"""Weight precisions the estimator knows, smallest first."""

COMPUTE_DTYPES: tuple[ComputeDtype, ...] = ("fp32", "bf16", "fp16")
"""Activation dtypes the estimator knows."""

OPTIMIZERS: tuple[Optimizer, ...] = ("adamw", "adamw8bit", "sgd")
"""Optimizers the estimator knows."""


@dataclass(frozen=True)
class TrainingSetup:
    """One way to train a LoRA adapter: everything that changes peak memory.

    Attributes:
        num_layers: Decoder layers the (sub-)LLM keeps; ``None`` means all of them.
        precision: Weight precision of the frozen base model.
        compute_dtype: Activation dtype; ``None`` picks the client's default: fp32 on CPU
            (and for fp32 weights), bf16 for bf16 weights and for 4/8-bit on CUDA, fp16 for
            fp16 weights.
        lora_rank: LoRA rank r.
        lora_targets: Module names LoRA wraps (PEFT matching: a module whose name equals the
            target or ends with ``.target``); ``("all-linear",)`` wraps every layer linear.
        lora_dropout: LoRA dropout (above 0 every wrapped module keeps its own dropped copy
            and mask).
        batch_size: Sequences per step.
        seq_len: Tokens per sequence (the estimate assumes full-length batches).
        optimizer: ``adamw``, ``adamw8bit`` or ``sgd``.
        grad_checkpointing: Recompute each layer's activations in backward.
        device: ``cpu`` or ``cuda``.
        unified_memory: CUDA device sharing memory with the host (Jetson).
        checkpoint_precision: Precision of the weights file loaded (``None``: the same as
            ``precision``, i.e. a prepared sub-LLM package).
        padded: Batches carry padding, so attention gets an explicit mask and key/value are
            repeated to every head (the client's batches do).
    """

    num_layers: int | None = None
    precision: Precision = "nf4"
    compute_dtype: ComputeDtype | None = None
    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    lora_dropout: float = 0.0
    batch_size: int = 4
    seq_len: int = 64
    optimizer: Optimizer = "adamw"
    grad_checkpointing: bool = False
    device: Device = "cpu"
    unified_memory: bool = False
    checkpoint_precision: Precision | None = None
    padded: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.checkpoint_precision is not None and self.checkpoint_precision not in PRECISIONS:
            problems.append(f"checkpoint_precision must be one of {list(PRECISIONS)}, got {self.checkpoint_precision!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            problems.append(f"compute_dtype must be one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.num_layers is not None and self.num_layers < 1:
            problems.append(f"num_layers must be >= 1, got {self.num_layers}")
        for name in ("lora_rank", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            problems.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if not self.lora_targets:
            problems.append("lora_targets must name at least one module")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.unified_memory and self.device != "cuda":
            problems.append("unified_memory applies to a CUDA device (Jetson)")
        if problems:
            raise ConfigError("invalid training setup: " + "; ".join(problems))

    @property
    def resolved_compute_dtype(self) -> ComputeDtype:
        """The compute dtype, with the client's defaults applied."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        if self.precision in ("bf16", "fp16"):
            return self.precision
        if self.precision in ("nf4", "int8") and self.device == "cuda":
            return "bf16"
        return "fp32"

    @property
    def tokens(self) -> int:
        """Tokens per step, ``batch_size * seq_len``."""
        return self.batch_size * self.seq_len


def wrapped_linears(shape: ModelShape, setup: TrainingSetup) -> list[LinearShape]:
    """The linears of one decoder layer that LoRA wraps.

    PEFT's matching: a module whose name equals a target or ends with ``.target``;
    ``all-linear`` wraps every one.

    Args:
        shape: The model.
        setup: The training setup (its ``lora_targets``).

    Returns:
        The wrapped linears, in the layer's order.
    """
    targets = setup.lora_targets
    if "all-linear" in targets:
        return list(shape.layer_linears)
    return [lin for lin in shape.layer_linears if any(lin.name == t or lin.name.endswith("." + t) for t in targets)]


def lora_param_count(shape: ModelShape, setup: TrainingSetup) -> int:
    """Trainable LoRA parameters: ``r * (in + out)`` per wrapped linear per kept layer."""
    n_layers = setup.num_layers or shape.num_layers
    return n_layers * sum(setup.lora_rank * (lin.in_features + lin.out_features) for lin in wrapped_linears(shape, setup))


__all__ = [
    "COMPUTE_DTYPES",
    "OPTIMIZERS",
    "PRECISIONS",
    "TrainingSetup",
    "lora_param_count",
    "wrapped_linears",
]
