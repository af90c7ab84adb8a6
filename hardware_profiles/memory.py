"""Peak-memory estimator for LoRA training of a (pruned) causal LM.

The estimate is built from the model's own config (its shape, read by
:func:`hardware_profiles.shape.model_shape` on PyTorch's ``meta`` device, so no weight is read
and nothing is allocated) and the training setup
(:class:`~hardware_profiles.training_setup.TrainingSetup`). It
models what the fedsoda client really runs (:func:`edge_client.trainer.train_adapter`: PEFT
LoRA, ``prepare_model_for_kbit_training`` for 4-bit models, AdamW, the proximal term) and
adds up, in bytes:

``framework``
    The process before any model exists: Python + torch + transformers + peft (+ the CUDA
    context on a GPU). Measured, see :data:`CPU_FRAMEWORK_BYTES`.
``weights``
    The frozen base model at its precision. NF4 with double quantization stores 0.5 byte per
    weight plus one uint8 absmax per 64 weights plus one fp32 absmax per 256 blocks; modules
    bitsandbytes leaves alone (embeddings, norms, ``lm_head``) are fp32 after
    ``prepare_model_for_kbit_training``.
``lora_state``
    Adapter parameters (fp32), their gradients, AdamW's two moments, and the trainer's fp32
    copy of the global adapter for the proximal term.
``activations``
    What autograd saves for the backward pass, per decoder layer and token, from the saved
    tensors of a Llama-style layer (checked against ``grad_fn._saved_*`` in the tests):
    two RMSNorm inputs (fp32), attention query / key / value / output (key and value
    repeated to every head when batches are padded) and log-sum-exp, the gated MLP's three
    intermediates, and each LoRA module's fp32 input and rank-``r`` projection. GPT-2-style
    layers (LayerNorm, ``gelu_new``, dropout) save more, also checked against ``grad_fn``:
    with attention dropout on CPU, SDPA's math path and its three ``seq_len x seq_len``
    matrices per head, two residual dropout masks, ``gelu_new``'s four intermediates
    (:func:`extra_layer_tensors`). With
    gradient checkpointing only each layer's input is kept, plus one layer recomputed in
    backward. The 4-D attention mask is counted once.
``logits``
    ``batch * seq_len * vocab`` fp32 values :data:`LOGITS_COPIES` times over at the start of
    backward (log-softmax, its gradient, the logits' gradient, the logits while held): for a
    small model with a large vocabulary this is the largest single term.
``allocator``
    On CPU, glibc ``malloc`` serves tensors below its mmap threshold (at most 32 MiB on 64-bit
    Linux) from heaps it rarely trims, so freed activations of one step are not all reused
    by the next: the resident set settles near :data:`CPU_HEAP_FACTOR` times the live size of
    those tensors. Larger tensors are mmapped and returned exactly. On CUDA, the caching
    allocator's fragmentation (:data:`CUDA_FRAGMENTATION`).
``load``
    Loading from a checkpoint of another precision holds the file's pages and the converted
    weights at once; the peak is the larger of loading and training. A 4-bit model loaded
    from an fp32 file counts the whole fp32 file (every page is read to quantize it) beside
    the 4-bit result. On CPU a checkpoint of the training precision is memory-mapped and
    used in place, so an untied input embedding is resident only for the rows the data reads.

The planner's ``checkpoint_precision=None`` means "the package is stored at the training
precision" (an NF4 package for an nf4 setup): no conversion at load. A client that loads a
4-bit model from an fp32 file must say ``checkpoint_precision="fp32"``, or the load peak is
under-estimated.

The constants marked *measured* were fitted to one run of ``benchmarks/memory_estimator.py``
(peak RSS of separate processes training the real SmolLM2 on CPU, six steps each; grid search
for the smallest worst-case distance from +5%), then checked on a second run with partly
different configurations. :data:`CPU_EXTRA_HEAP_FACTOR` was fitted on the benchmark's three
GPT-2 configurations and the untied-embedding term checked on its Qwen2 (152k vocabulary,
untied head) and Llama-3.2 cuts, random-weight models built from the published configs
(``benchmarks/results/memory_estimator.md`` has every row and which run measured it). The CUDA ones are
typical figures from PyTorch practice, not measured here, and say so.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from hardware_profiles.shape import ModelShape, model_shape
from hardware_profiles.training_setup import (
    Device,
    Precision,
    TrainingSetup,
    lora_param_count,
    wrapped_linears,
)
from shared.errors import ConfigError

MIB = 1 << 20

# --------------------------------------------------------------------------- constants

CPU_FRAMEWORK_BYTES = 480 * MIB
"""*Measured.* Resident set of a client process beside its tensors: Python, torch 2.13,
transformers 5.23-5.24, peft 0.21, bitsandbytes and fedsoda's own modules (345-390 MiB right
after the imports here), plus what training adds that no formula here names (thread pools, oneDNN
scratch, tokenizer, dataset, PEFT wrappers: about 100 MiB). Fitted with the other *measured*
constants on the benchmark's configurations."""

CPU_HEAP_FACTOR = 2.4
"""*Measured.* Resident / live bytes of activation tensors that glibc serves from its heaps
(those below :data:`CPU_MMAP_THRESHOLD`), once training has run a few steps: the fit over the
benchmark's configurations. With ``MALLOC_MMAP_THRESHOLD_=131072`` (every tensor mmapped and
returned on free) the full 30-layer fp32 run peaks at the live size the formulas give, which
is how this term was isolated: the rest is heap that glibc keeps but cannot reuse for the
next step's tensors (1.4 times the live size, fitted)."""

CPU_EXTRA_HEAP_FACTOR = 1.5
"""*Measured.* The same ratio for the saved tensors a Llama-style layer does not have
(:func:`extra_layer_tensors`: GPT-2's attention probability matrices, dropout masks and
``gelu_new`` intermediates). They are created once each step and kept until backward, the
same sizes every step, so glibc reuses their chunks: fitted on the three GPT-2 configurations
of the benchmark; the Llama-style transients that :data:`CPU_HEAP_FACTOR` stands for are what
fragments the heaps."""

LOGITS_COPIES = 3.5
"""*Measured.* ``batch * seq_len * vocab`` fp32 tensors live at the start of backward: three
always (log-softmax, its gradient, the logits' gradient), plus the logits themselves for as
long as the trainer holds the model's output (the label-word loss does, the plain LM loss
drops it). Fitted on the benchmark's 19 configurations (the 152k-vocabulary Qwen2 cut with
4 x 128 tokens needed fewer than 4: +17% with 4)."""

CPU_LOGITS_HEAP_FACTOR = 1.0
"""*Measured.* The same ratio for the four logits-sized tensors when they are small enough for
the heaps (short batches): they are allocated and freed in the same order every step, so their
chunks are reused exactly."""

CPU_CHECKPOINT_HEAP_FACTOR = 0.5
"""*Measured.* With gradient checkpointing on CPU, heap that stays resident in units of the
activations the layers would have saved without checkpointing (below the mmap threshold):
every layer's forward runs twice and frees its tensors in between."""

CPU_EMBEDDING_ROWS_TOUCHED = 32768
"""*Assumed bound, not fitted.* Distinct token ids a client's dataset feeds the input
embedding (a few thousand for the benchmark's 48 IMDB reviews; 32k covers a large English
dataset): rows of an untied, memory-mapped embedding beyond these are never read, so never
resident (:func:`_unread_embedding_bytes`)."""

CPU_MMAP_THRESHOLD = 32 * MIB
"""glibc's largest dynamic mmap threshold on 64-bit Linux (``DEFAULT_MMAP_THRESHOLD_MAX``):
bigger allocations are always mmapped and given back on free."""

CPU_DEQUANT_FACTOR = 0.75
"""*Measured.* bitsandbytes on CPU without its optional kernel package dequantizes each
4-bit weight to the compute dtype for every matmul, forward and backward; the freed buffers
(those below :data:`CPU_MMAP_THRESHOLD`) stay in glibc's heaps. Resident overhead, in units of
the dequantized size of those weights, per forward + backward (checkpointing adds half again)."""

CUDA_CONTEXT_BYTES = 500 * MIB
"""*Typical, not measured here.* CUDA context, cuBLAS / cuDNN workspaces on a discrete GPU
(300-600 MiB with torch 2.x, depending on the card and CUDA version)."""

JETSON_RUNTIME_BYTES = 1200 * MIB
"""*Typical, not measured here.* On a Jetson the host process (Python, torch, transformers)
and the CUDA runtime libraries live in the same memory as the tensors: about 1.2 GiB RSS
once CUDA is initialised with JetPack 6 torch wheels."""

CUDA_FRAGMENTATION = 1.15
"""*Typical, not measured here.* Reserved / allocated ratio of PyTorch's caching allocator
for training loops with steady shapes."""

_NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed nibbles + uint8 absmax + fp32 absmax2
_INT8_BYTES_PER_WEIGHT = 1.0
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_PYTHON_GELUS = frozenset({"gelu_new", "gelu_fast"})  # tanh approximations written as several ops
_LORA_STATE_BYTES = {"adamw": 4 + 4 + 8 + 4, "adamw8bit": 4 + 4 + 2 + 4, "sgd": 4 + 4 + 4}
"""Per LoRA parameter: fp32 value, gradient, optimizer moments, the proximal term's global copy."""


# --------------------------------------------------------------------------- estimate


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of one training setup.

    Attributes:
        total_bytes: The peak: framework + max(loading, training).
        breakdown: Bytes per component (``framework``, ``weights``, ``lora_state``,
            ``activations``, ``logits``, ``allocator``, ``load_peak``); the training peak is
            the sum of all but ``framework`` and ``load_peak``.
        peak_phase: ``train`` or ``load`` (which phase sets the peak).
        setup: The setup estimated (with ``num_layers`` resolved).
        lora_params: Trainable LoRA parameters.
        device: ``cpu`` (peak process RSS) or ``cuda`` (device memory; on unified memory the
            whole process).
    """

    total_bytes: int
    breakdown: dict[str, int]
    peak_phase: Literal["train", "load"]
    setup: TrainingSetup
    lora_params: int
    device: Device

    def to_dict(self) -> dict[str, Any]:
        """Plain types (for JSON and the wire)."""
        out = asdict(self)
        out["setup"]["lora_targets"] = list(self.setup.lora_targets)
        return out


def input_group(name: str) -> str:
    """The key of the tensor that feeds linear ``name``: linears fed by the same tensor
    (q/k/v; gate/up) share one saved input, so autograd keeps it once.

    Public because :mod:`coordinator.model.footprint` counts the same saved inputs.
    """
    leaf = name.rsplit(".", 1)[-1]
    parent = name.rsplit(".", 1)[0] if "." in name else ""
    if leaf in ("q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "Wqkv"):
        return parent + ".in"
    if leaf in ("gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc", "dense_h_to_4h"):
        return parent + ".in"
    return name


def layer_activation_tensors(shape: ModelShape, setup: TrainingSetup) -> list[tuple[int, int]]:
    """Tensors autograd saves in one decoder layer, as ``(bytes per token, count)`` pairs.

    Args:
        shape: The model.
        setup: The training setup.

    Returns:
        One pair per kind of saved tensor; a tensor's size is ``bytes_per_token * tokens``.
    """
    return _base_layer_tensors(shape, setup) + extra_layer_tensors(shape, setup)


def _base_layer_tensors(shape: ModelShape, setup: TrainingSetup) -> list[tuple[int, int]]:
    """What a Llama-style layer saves (norm inputs, fused attention, MLP, LoRA); the rest of
    :func:`layer_activation_tensors`."""
    cb = _DTYPE_BYTES[setup.resolved_compute_dtype]
    h, inter = shape.hidden_size, shape.intermediate_size
    q_width = shape.num_heads * shape.head_dim
    kv_width = q_width if setup.padded else shape.num_kv_heads * shape.head_dim
    # LayerNorm saves its input as it comes; Llama-style RMSNorms upcast it to fp32 first.
    out: list[tuple[int, int]] = [(h * (cb if shape.layer_norm else 4), 2)]
    if _math_attention(shape, setup):
        # PyTorch's CPU flash kernel has no dropout, so SDPA takes the math path: it saves the
        # (scaled) query, key and value for its two matmuls (and the probability matrices,
        # see extra_layer_tensors), not the attention output. It runs in fp32 even for bf16 /
        # fp16 inputs (it upcasts them).
        out += [(q_width * 4, 1), (kv_width * 4, 2)]
    else:
        out += [
            (q_width * cb, 2),  # attention query and output
            (kv_width * cb, 2),  # key and value (repeated per head when a mask forces it)
            (shape.num_heads * 4, 1),  # log-sum-exp of the fused attention
        ]
    out.append((inter * cb, 3 if shape.gated_mlp else 1))  # gate, activation, up (or the activation's input)
    wrapped = wrapped_linears(shape, setup)
    if setup.lora_dropout > 0:
        # Every LoRA module drops its own copy of the input and keeps the fp32 mask.
        out += [(lin.in_features * 4, 2) for lin in wrapped]
    elif cb != 4:
        # PEFT casts the input to the fp32 adapter dtype, one copy per module.
        out += [(lin.in_features * 4, 1) for lin in wrapped]
    else:
        groups = {input_group(lin.name): lin.in_features for lin in wrapped}
        out += [(width * 4, 1) for width in groups.values()]
    if wrapped:
        out.append((setup.lora_rank * 4, len(wrapped)))  # lora_A outputs, saved by lora_B
    return out


def extra_layer_tensors(shape: ModelShape, setup: TrainingSetup) -> list[tuple[int, int]]:
    """Saved tensors of a layer beyond a Llama-style one's (GPT-2 style: checked against
    ``grad_fn._saved_*`` in the tests): the math-path attention's three ``seq_len x seq_len``
    matrices per head, the residual dropouts' masks, and ``gelu_new``'s three intermediates
    beyond the activation's input. Empty for Llama, Qwen2, SmolLM2."""
    out: list[tuple[int, int]] = []
    if _math_attention(shape, setup):
        out.append((shape.num_heads * setup.seq_len * 4, 3))  # softmax, dropout mask, dropped probabilities
    if shape.residual_dropout > 0:
        out.append((shape.hidden_size * dropout_mask_bytes(setup), 2))  # after attention and after the MLP
    if not shape.gated_mlp and shape.activation in _PYTHON_GELUS:
        out.append((shape.intermediate_size * _DTYPE_BYTES[setup.resolved_compute_dtype], 3))
    return out


def _math_attention(shape: ModelShape, setup: TrainingSetup) -> bool:
    """PyTorch's CPU flash kernel has no dropout: with attention dropout, SDPA takes the math
    path (:func:`_base_layer_tensors` says what it saves)."""
    return shape.attention_dropout > 0 and setup.device == "cpu"


def dropout_mask_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of what a dropout saves for backward: on CPU ``torch.dropout`` builds
    the mask as a scaled tensor of the input's dtype (``_dropout_impl``); the fused CUDA kernel
    keeps a bool mask."""
    return _DTYPE_BYTES[setup.resolved_compute_dtype] if setup.device == "cpu" else 1


def sized_bytes(tensors: list[tuple[int, int]], tokens: int, heap_factor: float, mmap_threshold: int) -> tuple[int, int]:
    """Resident size of tensors of ``tokens`` tokens each.

    Args:
        tensors: ``(bytes per token, count)`` pairs, as :func:`layer_activation_tensors` gives.
        tokens: Tokens per tensor.
        heap_factor: Resident / live bytes of a tensor the allocator serves from its heaps.
        mmap_threshold: Tensors of at least this many bytes are mmapped: no heap overhead.

    Returns:
        ``(live bytes, allocator overhead)``.
    """
    live = overhead = 0
    for per_token, count in tensors:
        size = per_token * tokens
        live += size * count
        if size < mmap_threshold:
            overhead += int(size * count * (heap_factor - 1))
    return live, overhead


def weight_bytes(shape: ModelShape, n_layers: int, precision: Precision) -> tuple[int, int]:
    """Resident weight bytes of ``shape`` cut to ``n_layers`` at ``precision``.

    Returns:
        ``(resident bytes, number of weights in the quantizable decoder linears)``.
    """
    linear = n_layers * shape.layer_linear_params
    rest = shape.total_params(n_layers) - linear
    if precision == "nf4":
        per_module = 2 * 256 * 4  # NF4 code books and second-level state per quantized module
        return int(linear * _NF4_BYTES_PER_WEIGHT) + per_module * n_layers * len(shape.layer_linears) + rest * 4, linear
    if precision == "int8":
        row_stats = n_layers * sum(lin.out_features * 4 for lin in shape.layer_linears)
        return int(linear * _INT8_BYTES_PER_WEIGHT) + row_stats + rest * 4, linear
    return shape.total_params(n_layers) * _DTYPE_BYTES[precision], linear


def estimate_training_memory(model_config: Any, setup: TrainingSetup) -> MemoryEstimate:
    """Estimate the peak memory of training a LoRA adapter.

    Args:
        model_config: The FULL model's config (anything
            :func:`~hardware_profiles.shape.model_shape` takes); the setup's ``num_layers``
            says how many of its layers the sub-LLM keeps.
        setup: The training setup.

    Returns:
        The :class:`MemoryEstimate`: on CPU the peak resident set of the training process;
        on CUDA the device memory (on a Jetson, the process's share of the unified memory).

    Raises:
        ModelError: The config cannot be read.
        ConfigError: ``num_layers`` exceeds the model's layers.
    """
    shape = model_config if isinstance(model_config, ModelShape) else model_shape(model_config)
    n_layers = setup.num_layers or shape.num_layers
    if n_layers > shape.num_layers:
        raise ConfigError(f"the setup keeps {n_layers} layers but the model has only {shape.num_layers}")
    setup = replace(setup, num_layers=n_layers)
    tokens = setup.tokens
    cb = _DTYPE_BYTES[setup.resolved_compute_dtype]
    on_cpu = setup.device == "cpu"
    heap_factor = CPU_HEAP_FACTOR if on_cpu else CUDA_FRAGMENTATION
    threshold = CPU_MMAP_THRESHOLD if on_cpu else 1 << 62  # every CUDA block is cached

    weights, _ = weight_bytes(shape, n_layers, setup.precision)
    weights -= _unread_embedding_bytes(shape, setup)
    n_lora = lora_param_count(shape, setup)
    lora_state = n_lora * _LORA_STATE_BYTES[setup.optimizer]

    per_layer = layer_activation_tensors(shape, setup)
    extra_heap = CPU_EXTRA_HEAP_FACTOR if on_cpu else heap_factor
    extra_kept: list[tuple[int, int]] = []
    recompute_over = 0
    if setup.grad_checkpointing:
        # Kept: each layer's input; in backward one layer is recomputed and its gradients
        # (about the same size again) are formed.
        kept = [(shape.hidden_size * cb, n_layers)] + [(b, 2 * c) for b, c in per_layer]
        if on_cpu:
            # Each layer's forward runs twice and frees its tensors in between, leaving heap
            # fragments in proportion to what the layers would have saved without checkpointing.
            small, _ = sized_bytes([(b, c * n_layers) for b, c in per_layer if b * tokens < threshold], tokens, 1.0, threshold)
            recompute_over = int(CPU_CHECKPOINT_HEAP_FACTOR * small)
    else:
        kept = [(b, c * n_layers) for b, c in _base_layer_tensors(shape, setup)]
        extra_kept = [(b, c * n_layers) for b, c in extra_layer_tensors(shape, setup)]
    kept.append((shape.hidden_size * (cb if shape.layer_norm else 4), 1))  # the final norm's input
    if shape.embedding_dropout > 0:
        kept.append((shape.hidden_size * dropout_mask_bytes(setup), 1))  # GPT-2's dropout on the embeddings
    act_live, act_over = sized_bytes(kept, tokens, heap_factor, threshold)
    x_live, x_over = sized_bytes(extra_kept, tokens, extra_heap, threshold)
    act_live, act_over = act_live + x_live, act_over + x_over + recompute_over
    if setup.padded:
        mask = setup.batch_size * setup.seq_len * setup.seq_len * cb  # one 4-D mask for all layers
        m_live, m_over = sized_bytes([(mask, 1)], 1, heap_factor, threshold)
        act_live, act_over = act_live + m_live, act_over + m_over
    # log-softmax, its gradient and the logits' gradient (and the logits while the trainer
    # holds them), fp32, at the start of backward: LOGITS_COPIES of them
    logit_live, logit_over = sized_bytes([(int(shape.vocab_size * 4 * LOGITS_COPIES), 1)], tokens, CPU_LOGITS_HEAP_FACTOR if on_cpu else heap_factor, threshold)

    dequant = 0
    if on_cpu and setup.precision in ("nf4", "int8"):
        # Every pass over a layer (forward, backward, and the recomputation under
        # checkpointing) dequantizes each of its weights once. Buffers below the mmap
        # threshold pile up in the heaps; larger ones are returned, but the biggest is held
        # while its matmul runs.
        sizes = [lin.numel * cb for lin in shape.layer_linears]
        passes = 3 if setup.grad_checkpointing else 2
        small = n_layers * sum(b for b in sizes if b < threshold)
        dequant = int(CPU_DEQUANT_FACTOR * passes / 2 * small) + max(sizes)

    allocator = act_over + logit_over + dequant
    if not on_cpu:
        # The CUDA allocator's overhead applies to everything it holds, weights included.
        allocator = int((weights + lora_state + act_live + logit_live) * (CUDA_FRAGMENTATION - 1))
    train = weights + lora_state + act_live + logit_live + allocator

    load_peak = _load_peak(shape, n_layers, setup, weights)
    if setup.device == "cuda" and setup.unified_memory:
        framework = JETSON_RUNTIME_BYTES
    elif setup.device == "cuda":
        framework = CUDA_CONTEXT_BYTES
    else:
        framework = CPU_FRAMEWORK_BYTES
    peak_phase: Literal["train", "load"] = "load" if load_peak > train else "train"
    breakdown = {
        "framework": framework,
        "weights": weights,
        "lora_state": lora_state,
        "activations": act_live,
        "logits": logit_live,
        "allocator": allocator,
        "load_peak": load_peak,
    }
    return MemoryEstimate(
        total_bytes=framework + max(train, load_peak),
        breakdown=breakdown,
        peak_phase=peak_phase,
        setup=setup,
        lora_params=n_lora,
        device=setup.device,
    )


def _unread_embedding_bytes(shape: ModelShape, setup: TrainingSetup) -> int:
    """Bytes of an UNTIED input embedding that never become resident.

    On CPU a checkpoint of the training precision is memory-mapped and used in place; the
    embedding lookup reads only the rows of the tokens it sees, and the kernel pages in only
    those (a row of a 896-wide fp32 matrix is about one page). A tied head reads the whole
    matrix every step, so this applies only when the head is untied. Measured on the untied
    Qwen2 cut of the benchmark: 454 MiB resident after loading 1.5 GiB of weights.
    """
    if setup.device != "cpu" or shape.lm_head_params == 0:
        return 0
    source = setup.checkpoint_precision or setup.precision
    if source != setup.precision or source not in _DTYPE_BYTES:
        return 0  # converted or quantized at load: every row is copied
    row = shape.embedding_params // max(shape.vocab_size, 1) * _DTYPE_BYTES[source]
    return max(shape.vocab_size - CPU_EMBEDDING_ROWS_TOUCHED, 0) * row


def _load_peak(shape: ModelShape, n_layers: int, setup: TrainingSetup, weights: int) -> int:
    """Bytes held while the weights load (file pages + converted copy)."""
    source = setup.checkpoint_precision or setup.precision
    if setup.device == "cuda" and not setup.unified_memory:
        return weights  # the host holds the file; the device receives the final tensors
    file_bytes, _ = weight_bytes(shape, n_layers, source)
    if source == setup.precision and source in ("fp32", "bf16", "fp16"):
        # safetensors are memory-mapped and used in place (CPU); on a Jetson the model is
        # loaded on the host then moved to the GPU, both in the same memory.
        return weights * (2 if setup.unified_memory else 1)
    # Converting or quantizing: the file's pages and the result coexist.
    return file_bytes + weights


def describe_bytes(n: int) -> str:
    """``1234567890`` -> ``"1.15 GiB"``; for messages and tables."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit in ("B", "KiB") else f"{value:.2f} {unit}"
        value /= 1024
    return f"{n} B"


#: Binary units only: a catalog "8 GB" device is 8 GiB, so "GB" (10^9 or 2^30?) is refused.
_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", re.IGNORECASE)


def parse_bytes(text: str, what: str = "size") -> int:
    """``"1.5GiB"`` -> ``1610612736``: the inverse of :func:`describe_bytes`, for flags.

    Args:
        text: A number of bytes (``"1048576"``) or a number with a binary unit: ``B``,
            ``KiB``, ``MiB``, ``GiB``, ``TiB`` (case-insensitive, space allowed: ``"800 MiB"``).
        what: What the size is, for the error message (e.g. ``"--memory-limit"``).

    Returns:
        The size in bytes (at least 1).

    Raises:
        ConfigError: Not such a size: empty, negative, zero, a fractional byte count, or a
            decimal / unknown unit (``GB`` is refused as ambiguous: write ``GiB``).
    """
    hint = "write e.g. 1.5GiB, 800MiB or a number of bytes"
    match = _SIZE_RE.fullmatch(text.strip())
    if match is None:
        raise ConfigError(f"{what} {text!r} is not a size: {hint}")
    number, typed_unit = match.groups()
    unit = typed_unit.lower()
    if unit not in _SIZE_UNITS:
        if unit in ("k", "m", "g", "t", "kb", "mb", "gb", "tb"):
            raise ConfigError(f"{what} {text!r}: {typed_unit!r} is ambiguous (powers of 1000 or 1024?); {hint}")
        raise ConfigError(f"{what} {text!r}: unknown unit {typed_unit!r}; {hint}")
    if _SIZE_UNITS[unit] == 1 and "." in number:
        raise ConfigError(f"{what} {text!r}: a byte count is a whole number; {hint}")
    size = int(float(number) * _SIZE_UNITS[unit])
    if size < 1:
        raise ConfigError(f"{what} {text!r} must be more than 0 bytes; {hint}")
    return size


__all__ = [
    "CPU_FRAMEWORK_BYTES",
    "CPU_HEAP_FACTOR",
    "MemoryEstimate",
    "describe_bytes",
    "parse_bytes",
    "estimate_training_memory",
    "layer_activation_tensors",
]
