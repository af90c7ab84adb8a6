"""The coordinator's memory estimate: what ``prune`` / ``serve`` will need, known before starting.

The estimate is built from the full model's config alone (its shape, read by
:func:`hardware_profiles.shape.model_shape` on PyTorch's ``meta`` device: no weight is read,
nothing is allocated) and the :class:`CoordinatorWorkload`. It models the lean coordinator of
issue #13: the phases run one after another, at most one student is alive at a time, the ODA
KL and the perplexity NLL are computed in chunks of :attr:`CoordinatorWorkload.kl_chunk_tokens`
tokens (no ``tokens x vocab`` tensor exists in full), the student is trained with gradient
checkpointing, and only trainable parameters get fp32 master weights when the model dtype is
not fp32. The peak is the largest phase, each on top of the framework and the full model:

``load``
    Reading the full model: its weights in the model dtype (tied embeddings once), plus the
    file's pages while they are converted when the checkpoint is stored in another dtype.
``sgp``
    One calibration forward of the backbone (no logits) with every layer's output captured:
    ``(L + 1)`` hidden states per token in the model dtype, stacked once more, an fp32
    normalised copy and the ``(L + 1) x (L + 1)`` Gram / angle matrices per token.
``oda``
    Per tier (the largest; the prune study's uniform-drop baseline too): the student's weights
    (non-layer parameters + kept layers), the trainable layers' gradient and AdamW state
    (+ fp32 master weight and gradient when the dtype is not fp32), each student layer's input
    (checkpointing) plus one layer recomputed with its gradients, the teacher's hidden states
    of the kept layers and the student's layer outputs for the hidden loss (fp32), and the KL
    chunk: about :data:`KL_CHUNK_TENSORS` ``C x V`` fp32 tensors.
``package``
    The student, its serialised / staged copy (:data:`PACKAGE_STAGING_FACTOR`) and the package
    model (NF4: 0.5 byte per layer weight + absmax, everything else fp32).
``evaluate``
    Perplexity: the student, one layer's activations of a no-grad forward and the NLL chunk
    (:data:`NLL_CHUNK_TENSORS` ``C x V`` fp32 tensors).

On CPU, activation tensors small enough for glibc's heaps are counted with the client
estimator's heap factor (:data:`hardware_profiles.memory.CPU_HEAP_FACTOR`); on CUDA every
allocation carries the caching allocator's overhead
(:data:`hardware_profiles.memory.CUDA_FRAGMENTATION`). The per-layer activation formula,
the shape reader and the NF4 byte count are the client estimator's
(:mod:`hardware_profiles.memory`); only the coordinator's own terms are written here.
Checking an estimate against the machine is :mod:`coordinator.model.preflight`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from coordinator.model.lm_head import DEFAULT_CHUNK_TOKENS
from hardware_profiles.memory import (
    CPU_CHECKPOINT_HEAP_FACTOR,
    CPU_HEAP_FACTOR,
    CPU_MMAP_THRESHOLD,
    CUDA_CONTEXT_BYTES,
    CUDA_FRAGMENTATION,
    describe_bytes,
    input_group,
    layer_activation_tensors,
    sized_bytes,
    weight_bytes,
)
from hardware_profiles.shape import ModelShape, model_shape
from hardware_profiles.training_setup import TrainingSetup
from shared.errors import ConfigError
from shared.layermap import bridge_layers, uniform_drop_layers

Dtype = Literal["fp32", "bf16", "fp16"]
Phase = Literal["load", "sgp", "oda", "package", "evaluate"]

MIB = 1 << 20
GIB = 1 << 30

# --------------------------------------------------------------------------- constants

COORDINATOR_CPU_FRAMEWORK_BYTES = 250 * MIB
"""*Measured.* Peak RSS of a process that imports what ``prune`` imports before its first
tensor (torch 2.13, transformers 5.23 with its model classes resolved, ``coordinator.cli``):
250 MiB, the median of three children reaped with ``os.wait4`` on this CPU
(``benchmarks/coordinator_memory.py``, ``baseline_rss`` of its rows). What prune adds beside
its tensors (bitsandbytes, the tokenizer, the public text) is not split out: it is part of the
difference the calibration against "after" rows will fit."""

CUDA_FRAMEWORK_BYTES = CUDA_CONTEXT_BYTES
"""*Typical, not measured here* (no GPU on the machine this was written on): the CUDA
context and cuBLAS workspaces, the client estimator's figure. The host process's own RSS is
not part of a CUDA estimate, which is device memory."""

KL_CHUNK_TENSORS = 6
"""*Derived from the loss, not measured.* ``C x V`` fp32 tensors alive while one KL chunk runs
forward and backward: student and teacher logits of the chunk (tempered), both log-softmaxes,
the teacher's probabilities and the gradient of the student's logits."""

NLL_CHUNK_TENSORS = 3
"""*Derived from the loss, not measured.* ``C x V`` fp32 tensors of one NLL chunk (no grad):
the logits, their fp32 upcast / log-softmax and the gathered cross-entropy's scratch."""

PACKAGE_STAGING_FACTOR = 1.0
"""*Derived from the code path, not measured.* Packaging round-trips the student through
``save_pretrained`` / ``from_pretrained`` (the path a client takes): serialising holds a byte
copy of the student's tensors, loading maps the staged file's pages while the quantized model
is built. Either way about one more student, in units of its weight bytes."""

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
"""Bytes per element of each model dtype."""

PHASES: tuple[Phase, ...] = ("load", "sgp", "oda", "package", "evaluate")
"""The phases of a prune run, in order."""


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class CoordinatorWorkload:
    """What the coordinator is asked to do: everything that changes its peak memory.

    Attributes:
        dtype: Dtype the full model and the students are held in.
        device: ``cpu`` (the estimate is the process's RSS) or ``cuda`` (device memory).
        calibration_batch_size: Sequences per SGP forward (and, unless overridden, per ODA
            step and perplexity batch).
        seq_len: Tokens per calibration / distillation sequence.
        depths: Layers each tier keeps.
        align_layers: ODA trains the ``bridge`` layers or ``all`` kept layers.
        block_size: Layers per SGP block (a tier prunes ``(L - depth) / block_size`` blocks).
        oda_steps: ODA optimiser steps (0: no distillation, no ODA phase).
        precision: Package precision: ``nf4``, ``bf16`` or ``fp32``.
        kl_chunk_tokens: Tokens per KL / NLL chunk ``C``.
        gradient_checkpointing: The student recomputes each layer in backward.
        oda_batch_size: Sequences per ODA step (None: ``calibration_batch_size``).
        eval_batch_size: Sequences per perplexity batch (None: ``calibration_batch_size``).
        eval_seq_len: Tokens per held-out sequence (None: ``seq_len``).
        num_layers: Layers of the full model (None: read from the config); used only to check
            the depths.
        baseline_student: Also distil a uniform-drop student at the smallest depth (the prune
            study's comparison); its bridge layers are those of
            :func:`shared.layermap.uniform_drop_layers`.
        checkpoint_dtype: Dtype the weights file stores (None: the config's ``dtype``, else
            ``dtype``): loading converts when it differs.
        evaluate: Perplexity is evaluated (the prune study does; ``serve`` may not).
    """

    dtype: Dtype = "fp32"
    device: Literal["cpu", "cuda"] = "cpu"
    calibration_batch_size: int = 8
    seq_len: int = 128
    depths: tuple[int, ...] = ()
    align_layers: Literal["bridge", "all"] = "bridge"
    block_size: int = 4
    oda_steps: int = 24
    precision: Literal["nf4", "bf16", "fp32"] = "nf4"
    kl_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    gradient_checkpointing: bool = True
    oda_batch_size: int | None = None
    eval_batch_size: int | None = None
    eval_seq_len: int | None = None
    num_layers: int | None = None
    baseline_student: bool = False
    checkpoint_dtype: Dtype | None = None
    evaluate: bool = True

    def __post_init__(self) -> None:
        problems = []
        if self.dtype not in DTYPE_BYTES:
            problems.append(f"dtype must be one of {list(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.checkpoint_dtype is not None and self.checkpoint_dtype not in DTYPE_BYTES:
            problems.append(f"checkpoint_dtype must be one of {list(DTYPE_BYTES)}, got {self.checkpoint_dtype!r}")
        if self.device not in ("cpu", "cuda"):
            problems.append(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.align_layers not in ("bridge", "all"):
            problems.append(f"align_layers must be 'bridge' or 'all', got {self.align_layers!r}")
        if self.precision not in ("nf4", "bf16", "fp32"):
            problems.append(f"precision must be nf4, bf16 or fp32, got {self.precision!r}")
        for name in ("calibration_batch_size", "seq_len", "block_size", "kl_chunk_tokens"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("oda_batch_size", "eval_batch_size", "eval_seq_len", "num_layers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                problems.append(f"{name} must be >= 1, got {value}")
        if self.oda_steps < 0:
            problems.append(f"oda_steps must be >= 0, got {self.oda_steps}")
        if not self.depths or any(d < 1 for d in self.depths):
            problems.append(f"depths must name at least one tier depth >= 1, got {self.depths!r}")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def resolved_oda_batch_size(self) -> int:
        """Sequences per ODA step."""
        return self.oda_batch_size or self.calibration_batch_size

    @property
    def resolved_eval_batch_size(self) -> int:
        """Sequences per perplexity batch."""
        return self.eval_batch_size or self.calibration_batch_size

    @property
    def resolved_eval_seq_len(self) -> int:
        """Tokens per held-out sequence."""
        return self.eval_seq_len or self.seq_len


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class CoordinatorEstimate:
    """Estimated peak memory of a coordinator workload.

    Attributes:
        total: The peak in bytes: the largest of :attr:`phases`.
        peak_phase: The phase that sets it.
        phases: Peak bytes of each phase, each including the framework and the full model.
        breakdown: Bytes per term (see the module docstring); the terms of one phase add up
            to its entry in :attr:`phases`.
        phase_terms: The term names each phase adds up.
        peak_tier: Depth of the tier (student) that sets the ODA / package peak.
        workload: The workload estimated.
        shape: The full model's shape (lets :func:`check_fits` re-estimate alternatives).
    """

    total: int
    peak_phase: Phase
    phases: dict[str, int]
    breakdown: dict[str, int]
    phase_terms: dict[str, tuple[str, ...]] = field(repr=False)
    peak_tier: int
    workload: CoordinatorWorkload
    shape: ModelShape = field(repr=False)

    def describe(self) -> str:
        """One line for people: the peak and its three largest parts.

        Example: ``the coordinator needs about 3.1 GiB (full model 2.0 GiB fp32, tier L18 student
        1.2 GiB, ODA working set 0.6 GiB; peak in oda, cpu)``.
        """
        b = self.breakdown
        w = self.workload
        parts = [f"full model {describe_bytes(b['full_model'])} {w.dtype}"]
        if self.peak_phase in ("oda", "package", "evaluate"):
            parts.append(f"tier L{self.peak_tier} student {describe_bytes(b['student'])}")
        working = self.phases[self.peak_phase] - sum(b[t] for t in ("framework", "full_model", "student") if t in self.phase_terms[self.peak_phase])
        label = {"load": "loading", "sgp": "SGP working set", "oda": "ODA working set", "package": "packaging", "evaluate": "evaluation working set"}
        parts.append(f"{label[self.peak_phase]} {describe_bytes(working)}")
        return f"the coordinator needs about {describe_bytes(self.total)} ({', '.join(parts)}; peak in {self.peak_phase}, {w.device})"

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for JSON reports)."""
        return {
            "total": self.total,
            "peak_phase": self.peak_phase,
            "phases": dict(self.phases),
            "breakdown": dict(self.breakdown),
            "peak_tier": self.peak_tier,
            "describe": self.describe(),
        }


def _no_lora_setup(workload: CoordinatorWorkload, batch: int, seq_len: int) -> TrainingSetup:
    # A setup whose LoRA wraps nothing: layer_activation_tensors then gives the base layer's
    # saved tensors only (norm inputs, attention, MLP intermediates) in the model dtype.
    return TrainingSetup(
        precision=workload.dtype,
        compute_dtype=workload.dtype,
        lora_targets=("__no_module__",),
        batch_size=batch,
        seq_len=seq_len,
        device=workload.device,
        padded=True,
    )


def _trainable_layer_inputs(shape: ModelShape, dtype_bytes: int) -> list[tuple[int, int]]:
    """Per token: the inputs a trainable layer's linears save for their weight gradients.

    Linears fed by the same tensor (q/k/v; gate/up) share one saved input.
    """
    groups = {input_group(lin.name): lin.in_features for lin in shape.layer_linears}
    return [(width * dtype_bytes, 1) for width in groups.values()]


def _layer_params(shape: ModelShape) -> int:
    return shape.layer_linear_params + shape.layer_other_params


def _worst_bridges(num_layers: int, depth: int, block_size: int) -> int:
    """Bridge layers of a tier before SGP has chosen its blocks: at most one per pruned block.

    The ranking is unknown before the calibration pass, so the estimate takes the worst case:
    every pruned block its own gap, each followed by a kept layer (the protected tail).
    """
    return min((num_layers - depth) // block_size, depth) if depth < num_layers else 0


def estimate_coordinator_memory(config_or_path: Any, workload: CoordinatorWorkload) -> CoordinatorEstimate:
    """Estimate the coordinator's peak memory for a workload, from the model's config alone.

    Args:
        config_or_path: The FULL model's config: a ``transformers.PretrainedConfig``, a config
            dict with ``model_type``, a ``config.json`` path, a model folder, or a
            :class:`~hardware_profiles.shape.ModelShape`.
        workload: What the coordinator runs.

    Returns:
        The :class:`CoordinatorEstimate`: on CPU the peak resident set of the process, on CUDA
        the device memory.

    Raises:
        ModelError: The config cannot be read.
        ConfigError: A depth the model cannot reach (deeper than the model, or the block
            size does not divide the layers it removes).
    """
    shape = config_or_path if isinstance(config_or_path, ModelShape) else model_shape(config_or_path)
    checkpoint_dtype = workload.checkpoint_dtype or _config_dtype(config_or_path) or workload.dtype
    n = shape.num_layers
    if workload.num_layers is not None and workload.num_layers != n:
        raise ConfigError(f"the workload says {workload.num_layers} layers but the model config has {n}")
    for depth in workload.depths:
        if depth > n or (n - depth) % workload.block_size:
            raise ConfigError(
                f"tier depth {depth} cannot be reached from {n} layers in blocks of {workload.block_size} "
                "(the removed layers must be a multiple of the block size)"
            )
    w = workload
    db = DTYPE_BYTES[w.dtype]
    h, v = shape.hidden_size, shape.vocab_size
    on_cpu = w.device == "cpu"
    heap = CPU_HEAP_FACTOR if on_cpu else 1.0
    threshold = CPU_MMAP_THRESHOLD if on_cpu else 1 << 62

    b: dict[str, int] = {}
    terms: dict[str, tuple[str, ...]] = {}
    b["framework"] = COORDINATOR_CPU_FRAMEWORK_BYTES if on_cpu else CUDA_FRAMEWORK_BYTES
    b["full_model"] = shape.total_params() * db

    # load: safetensors in the model dtype are used in place; another dtype is converted,
    # holding the file's pages and the result at once (on CUDA the pages stay on the host).
    b["load_conversion"] = shape.total_params() * DTYPE_BYTES[checkpoint_dtype] if (on_cpu and checkpoint_dtype != w.dtype) else 0
    terms["load"] = ("framework", "full_model", "load_conversion")

    # sgp: captured hidden states (model dtype), their stacked copy, the fp32 normalised copy,
    # and the Gram and angle matrices per token. The backbone runs without the LM head.
    tokens = w.calibration_batch_size * w.seq_len
    # Per token: L + 1 captured states (model dtype, one tensor each), then one stacked
    # [N, L + 1, H] tensor upcast / normalised: two fp32 tensors of that size at the peak.
    captured = [(h * db, n + 1), ((n + 1) * h * 4, 2)]
    live, over = sized_bytes(captured, tokens, heap, threshold)
    b["sgp_hidden_states"] = live + over
    gram_live, gram_over = sized_bytes([((n + 1) ** 2 * 4, 2)], tokens, heap, threshold)  # Gram and angles
    b["sgp_gram"] = gram_live + gram_over
    one_layer = sized_bytes(layer_activation_tensors(shape, _no_lora_setup(w, w.calibration_batch_size, w.seq_len)), tokens, heap, threshold)
    b["sgp_layer_forward"] = sum(one_layer)
    terms["sgp"] = ("framework", "full_model", "sgp_hidden_states", "sgp_gram", "sgp_layer_forward")

    # oda: the largest student (one alive at a time), with its trainable state and working set.
    students = [(d, d if w.align_layers == "all" else _worst_bridges(n, d, w.block_size)) for d in w.depths]
    if w.baseline_student:
        smallest = min(w.depths)
        uniform = uniform_drop_layers(n, smallest)
        students.append((smallest, smallest if w.align_layers == "all" else len(bridge_layers(uniform))))
    candidates = [(depth, _oda_terms(shape, w, depth, trained, heap, threshold)) for depth, trained in students]
    peak_depth, chosen = max(candidates, key=lambda c: sum(c[1].values()))
    if w.oda_steps == 0:
        chosen = dict.fromkeys(chosen, 0)  # no distillation: no student is trained
    b.update(chosen)
    terms["oda"] = ("framework", "full_model", *chosen)
    deepest = max(w.depths)

    # package: the (deepest) student, its staged copy and the package model (quantized on CPU:
    # on CUDA only the student is device memory).
    student = _student_bytes(shape, deepest, db)
    b["package_student"] = student
    b["package_staging"] = int(PACKAGE_STAGING_FACTOR * student) if on_cpu else 0
    b["package_model"] = weight_bytes(shape, deepest, w.precision)[0] if on_cpu else 0
    terms["package"] = ("framework", "full_model", "package_student", "package_staging", "package_model")

    # evaluate: a no-grad forward of the student, one layer at a time, and the NLL chunk.
    e_batch, e_seq = w.resolved_eval_batch_size, w.resolved_eval_seq_len
    e_tokens = e_batch * e_seq
    layer_live, layer_over = sized_bytes(layer_activation_tensors(shape, _no_lora_setup(w, e_batch, e_seq)), e_tokens, heap, threshold)
    mask_live, mask_over = sized_bytes([(e_batch * e_seq * e_seq * db, 1)], 1, heap, threshold)
    chunk = min(w.kl_chunk_tokens, e_tokens)
    nll_live, nll_over = sized_bytes([(v * 4, NLL_CHUNK_TENSORS)], chunk, 1.0, threshold)
    b["eval_student"] = student if w.evaluate else 0
    # The layer's tensors, the 4-D mask, and the residual stream entering and leaving it.
    b["eval_activations"] = (layer_live + layer_over + mask_live + mask_over + 2 * e_tokens * h * db) if w.evaluate else 0
    b["eval_nll_chunk"] = nll_live + nll_over if w.evaluate else 0
    terms["evaluate"] = ("framework", "full_model", "eval_student", "eval_activations", "eval_nll_chunk")

    phases = {phase: sum(b[t] for t in terms[phase]) for phase in PHASES}
    if not on_cpu:
        # The caching allocator keeps a share of everything it hands out (weights included).
        for phase in PHASES:
            extra = int((phases[phase] - b["framework"]) * (CUDA_FRAGMENTATION - 1))
            b[f"allocator_{phase}"] = extra
            terms[phase] = (*terms[phase], f"allocator_{phase}")
            phases[phase] += extra
    if w.oda_steps == 0:
        phases["oda"] = 0
    peak_phase: Phase = max(PHASES, key=lambda p: phases[p])
    return CoordinatorEstimate(
        total=phases[peak_phase],
        peak_phase=peak_phase,
        phases=phases,
        breakdown=b,
        phase_terms=terms,
        peak_tier=peak_depth if peak_phase == "oda" and w.oda_steps > 0 else deepest,
        workload=workload,
        shape=shape,
    )


def _student_bytes(shape: ModelShape, depth: int, dtype_bytes: int) -> int:
    """Weights of a sub-LLM keeping ``depth`` layers (non-layer parameters + kept layers)."""
    return shape.total_params(depth) * dtype_bytes


def _oda_terms(shape: ModelShape, w: CoordinatorWorkload, depth: int, trained: int, heap: float, threshold: int) -> dict[str, int]:
    """The ODA phase's terms for one student: ``depth`` kept layers, ``trained`` of them trained."""
    db = DTYPE_BYTES[w.dtype]
    h, v = shape.hidden_size, shape.vocab_size
    batch = w.resolved_oda_batch_size
    tokens = batch * w.seq_len
    trainable = trained * _layer_params(shape)
    # Gradient in the model dtype, AdamW's two fp32 moments; a non-fp32 model trains fp32
    # master copies (value and gradient) of the trainable parameters only.
    per_param = db + 8 + (8 if db != 4 else 0)
    per_layer = layer_activation_tensors(shape, _no_lora_setup(w, batch, w.seq_len)) + _trainable_layer_inputs(shape, db)
    if w.gradient_checkpointing:
        # Kept: each student layer's input; in backward one layer is recomputed and its
        # gradients (about the same size again) are formed.
        saved = [(h * db, depth)] + [(bpt, 2 * c) for bpt, c in per_layer]
    else:
        saved = [(bpt, c * depth) for bpt, c in per_layer]
    saved += [
        (h * db, depth),  # the teacher's hidden states at the kept layers
        (h * 4, depth),  # the student's layer outputs (fp32) for the hidden-state loss
        (h * 4, 1),  # the final norm's input
    ]
    act_live, act_over = sized_bytes(saved, tokens, heap, threshold)
    if w.gradient_checkpointing and heap > 1.0:
        # Each layer's forward runs twice on CPU and frees its tensors in between: the client
        # estimator's measured residue, in units of what the layers would have saved.
        small, _ = sized_bytes([(bpt, c * depth) for bpt, c in per_layer if bpt * tokens < threshold], tokens, 1.0, threshold)
        act_over += int(CPU_CHECKPOINT_HEAP_FACTOR * small)
    mask_live, mask_over = sized_bytes([(batch * w.seq_len * w.seq_len * db, 1)], 1, heap, threshold)
    chunk = min(w.kl_chunk_tokens, tokens)
    kl_live, kl_over = sized_bytes([(v * 4, KL_CHUNK_TENSORS)], chunk, 1.0, threshold)
    return {
        "student": _student_bytes(shape, depth, db),
        "trainable_state": trainable * per_param,
        "oda_activations": act_live + act_over + mask_live + mask_over,
        "kl_chunk": kl_live + kl_over,
    }


def _config_dtype(config_or_path: Any) -> Dtype | None:
    """The dtype a model's config says its weights are stored in (None when it does not say)."""
    if isinstance(config_or_path, ModelShape):
        return None
    try:
        from hardware_profiles.shape import _config_from

        config = _config_from(config_or_path)
    except Exception:  # noqa: BLE001 - model_shape already reported an unreadable config
        return None
    value = getattr(config, "dtype", None)  # transformers 5 name (torch_dtype is deprecated)
    name = str(value).replace("torch.", "") if value is not None else ""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(name)


__all__ = [
    "COORDINATOR_CPU_FRAMEWORK_BYTES",
    "CoordinatorEstimate",
    "CoordinatorWorkload",
    "DTYPE_BYTES",
    "KL_CHUNK_TENSORS",
    "NLL_CHUNK_TENSORS",
    "PACKAGE_STAGING_FACTOR",
    "estimate_coordinator_memory",
]
