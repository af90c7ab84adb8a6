"""Local QLoRA training of one round: the client half of the federated method.

:func:`train_adapter` adds LoRA to the (sub-)LLM the client holds, starts it from the global
adapter, takes ``local_steps`` AdamW steps on

    loss = causal-LM loss on the answer tokens + (mu / 2) * ||theta - theta_global||^2

(theta: the LoRA parameters), and returns ``delta = theta_local - theta_global`` keyed by
FULL-LLM layer index (:mod:`shared.adapters`), in float32 on the CPU.

The base model is left as it was found: LoRA is injected for the call and removed afterwards
(``unload``), so the caller can evaluate the bare model or train the next round on it.

Mid-round checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`) hold the adapter,
the global adapter it started from, AdamW's moments and the RNG state in one safetensors file
plus a JSON sidecar. Resuming from one gives the same result, bit for bit on CPU, as a run
that never stopped. Nothing here unpickles anything.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from edge_client.data import IGNORE_INDEX, LocalDataset, batch_indices, make_batch
from shared.adapters import LoraSettings, to_full_keys, to_sub_keys
from shared.errors import DataError, ModelError, RunStateError
from shared.subllm import is_4bit, linear4bit_modules

if TYPE_CHECKING:
    from shared.protocol import TrainingParams

log = logging.getLogger(__name__)

CHECKPOINT_TENSORS = "train_state.safetensors"
CHECKPOINT_JSON = "train_state.json"
CHECKPOINT_FORMAT = 1
_ADAPTER_NAME = "default"


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training produced.

    Attributes:
        delta: ``theta_local - theta_global`` per LoRA tensor, canonical full-LLM keys
            (e.g. ``base_model.model.model.layers.17.self_attn.q_proj.lora_A.weight``),
            float32 CPU tensors shaped like the LoRA weights (A ``[r, in]``, B ``[out, r]``).
        num_examples: n_c, the size of the local dataset (the FedAvg weight).
        metrics: ``steps``, ``resumed_from_step``, ``prox_last`` (``||theta - theta_global||^2``
            before the last step), ``step_seconds_mean``, ``answer_tokens``, ``delta_norm``,
            ``learning_rate``, ``mu``, and when at least one step ran ``loss_first``,
            ``loss_last``, ``loss_mean`` (task loss) and ``grad_norm_first``,
            ``grad_norm_last`` (before clipping); all floats.
    """

    delta: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class TrainProgress:
    """Passed to ``progress_cb`` after every optimizer step.

    Attributes:
        step: Steps completed so far this round (1-based after the first step).
        total_steps: ``local_steps`` of the round.
        loss: Task loss of the step.
        prox: Proximal term ``||theta - theta_global||^2`` before the step.
        seconds: Wall time of the step.
    """

    step: int
    total_steps: int
    loss: float
    prox: float
    seconds: float


@dataclass(frozen=True)
class TrainCheckpoint:
    """A mid-round training state, enough to carry on after a crash.

    Attributes:
        round_num: The round being trained.
        step: Optimizer steps completed.
        params: The round's TrainingParams as a plain dict (must match on resume).
        adapter: LoRA tensors after ``step`` steps (sub-LLM keys, adapter name stripped).
        global_adapter: The LoRA tensors the round started from (sub-LLM keys).
        optimizer: AdamW state per trainable tensor, keyed ``"<i>.<name>"`` (``i`` in
            :attr:`adapter` key order).
        rng: ``"cpu"`` (and ``"cuda"``) RNG states as uint8 tensors.
        losses: Task loss of every step taken.
        grad_norms: Pre-clipping gradient norm of every step taken.
        step_seconds: Wall time of every step taken.
        answer_tokens: Answer tokens trained on so far.
    """

    round_num: int
    step: int
    params: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    global_adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    rng: dict[str, torch.Tensor]
    losses: tuple[float, ...] = ()
    grad_norms: tuple[float, ...] = ()
    step_seconds: tuple[float, ...] = ()
    answer_tokens: int = 0


def params_dict(params: TrainingParams) -> dict[str, Any]:
    """TrainingParams as plain JSON types (lists for sequences)."""
    raw = dataclasses.asdict(params) if dataclasses.is_dataclass(params) else dict(vars(params))
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in raw.items()}


def round_seed(seed: int, round_num: int) -> int:
    """The RNG seed of one round: every round draws fresh batches and dropout masks."""
    digest = hashlib.sha256(f"fedsoda-train/{seed}/{round_num}".encode()).digest()
    return int.from_bytes(digest[:7], "big")


# ---------------------------------------------------------------------------------------------
# Model preparation


def check_4bit_cpu_layout(model: torch.nn.Module) -> None:
    """Refuse 4-bit weights that bitsandbytes has repacked for CPU inference.

    On CPUs with AVX512_BF16, bitsandbytes 0.50 repacks a 4-bit weight the first time it
    runs in eval mode without grad; that layout's matmul has no autograd, so LoRA gradients
    come out missing or wrong. Loading with the workaround (``support_avx512bf16_for_cpu =
    False`` on every ``Linear4bit``, as ``shared.subllm.load_package`` does) prevents it.

    Args:
        model: The model about to be trained.

    Raises:
        ModelError: Some 4-bit weight is already in the CPU inference layout.
    """
    repacked = [
        m
        for m in linear4bit_modules(model)
        if getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
    ]
    if repacked:
        raise ModelError(
            f"{len(repacked)} 4-bit layers were repacked for CPU inference (an eval pass ran "
            "without the AVX512_BF16 workaround), so LoRA gradients would be wrong; reload the "
            "sub-LLM with shared.subllm.load_package, which disables that repacking"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def attach_lora(
    model: torch.nn.Module, params: TrainingParams, *, gradient_checkpointing: bool = False
) -> torch.nn.Module:
    """Freeze the base model and wrap it with a fresh LoRA adapter.

    4-bit models go through ``peft.prepare_model_for_kbit_training`` (norms in fp32, base
    frozen). Gradient checkpointing uses the non-reentrant variant, which needs no
    input-gradient hook. Undo with :func:`detach_lora`.

    Args:
        model: A Hugging Face causal LM (plain or 4-bit), not already PEFT-wrapped.
        params: Rank, alpha, dropout and target modules come from here.
        gradient_checkpointing: Recompute activations in backward to save memory.

    Returns:
        The ``peft.PeftModel``.

    Raises:
        ModelError: The model is already PEFT-wrapped, its 4-bit weights are in the CPU
            inference layout, or no target module exists in it.
    """
    from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training

    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ModelError("the model already carries a PEFT adapter; pass the bare (sub-)LLM")
    if params.lora_rank < 1:
        raise ModelError(f"LoRA rank must be >= 1, got {params.lora_rank}")
    quantized = is_4bit(model)
    if quantized:
        check_4bit_cpu_layout(model)
        # Checkpointing is switched on below, not by PEFT, which still uses the deprecated name.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        for p in model.parameters():
            p.requires_grad_(False)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input-gradient hook on a frozen embedding.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraSettings.from_training(params).peft_config()
    try:
        return get_peft_model(model, config, adapter_name=_ADAPTER_NAME)
    except ValueError as exc:
        raise ModelError(f"cannot add LoRA to target modules {list(params.target_modules)}: {exc}") from exc


def detach_lora(peft_model: torch.nn.Module) -> torch.nn.Module:
    """Remove the LoRA layers (without merging) and return the bare base model."""
    base = peft_model.unload()
    _disable_checkpointing(base)
    return base


def _disable_checkpointing(model: torch.nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        if model.is_activation_checkpointing:
            model.activation_checkpointing_disable()
    elif getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()


def adapter_parameters(peft_model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters keyed like ``get_peft_model_state_dict`` keys them.

    Args:
        peft_model: A model from :func:`attach_lora`.

    Returns:
        ``{key: parameter}`` in module order, keys on the sub-LLM (adapter name stripped).
    """
    from peft import get_peft_model_state_dict

    by_ptr = {p.data_ptr(): (n, p) for n, p in peft_model.named_parameters() if p.requires_grad}
    out = {}
    for key, tensor in get_peft_model_state_dict(peft_model, adapter_name=_ADAPTER_NAME).items():
        hit = by_ptr.pop(tensor.data_ptr(), None)
        if hit is not None:
            out[key] = hit[1]
    if by_ptr:
        raise ModelError(f"trainable parameters outside the adapter state dict: {sorted(n for n, _ in by_ptr.values())[:5]}")
    return out


def _initial_lora_value(canonical_key: str, shape: torch.Size, seed: int) -> torch.Tensor | None:
    """Deterministic LoRA init per canonical key, so every tier starts from the same tensors.

    PEFT's own init draws from one RNG stream in module order, so a 6-layer and a 10-layer
    client would give full-LLM layer 17 different A matrices. Seeding by key avoids that.
    A is kaiming-uniform (as PEFT: bound 1/sqrt(fan_in)), B is zero.
    """
    if canonical_key.endswith("lora_B.weight"):
        return torch.zeros(shape)
    if canonical_key.endswith("lora_A.weight"):
        digest = hashlib.sha256(f"{seed}/{canonical_key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:7], "big"))
        bound = 1.0 / math.sqrt(shape[1])
        return (torch.rand(shape, generator=gen) * 2 - 1) * bound
    return None


def _load_start(
    adapter: Mapping[str, torch.nn.Parameter],
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
    seed: int,
) -> None:
    with torch.no_grad():
        if global_adapter is None:
            for key, p in adapter.items():
                (canonical,) = to_full_keys({key: p}, layer_map, layers_prefix)
                value = _initial_lora_value(canonical, p.shape, seed)
                if value is not None:
                    p.copy_(value)
            return
        sub = to_sub_keys(global_adapter, layer_map, layers_prefix)
        missing = [k for k in adapter if k not in sub]
        extra = [k for k in sub if k not in adapter]
        if missing or extra:
            raise ModelError(
                "the global adapter does not fit this sub-LLM's LoRA layout (check the schedule's "
                f"target_modules and rank): missing {missing[:3]} ({len(missing)}), unexpected "
                f"{extra[:3]} ({len(extra)})"
            )
        for key, p in adapter.items():
            value = sub[key]
            if tuple(value.shape) != tuple(p.shape):
                raise ModelError(
                    f"global adapter tensor {key} has shape {tuple(value.shape)}, the local LoRA "
                    f"layer {tuple(p.shape)} (LoRA rank or model mismatch)"
                )
            if not torch.isfinite(value).all():
                raise ModelError(f"global adapter tensor {key} holds NaN or Inf")
            p.copy_(value.to(dtype=p.dtype, device=p.device))


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _optimizer_tensors(optimizer: torch.optim.Optimizer, n_params: int) -> dict[str, torch.Tensor]:
    out = {}
    state = optimizer.state_dict()["state"]
    for i in range(n_params):
        for name, value in state.get(i, {}).items():
            tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
            out[f"{i}.{name}"] = tensor.detach().to("cpu").clone()
    return out


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    full = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        # AdamW keeps its step count on the CPU; moments live with the parameters.
        state.setdefault(int(index), {})[name] = value if name == "step" else value.to(device)
    full["state"] = state
    optimizer.load_state_dict(full)


def save_checkpoint(directory: str | Path, checkpoint: TrainCheckpoint) -> Path:
    """Write a checkpoint atomically: tensors to safetensors, the rest to JSON.

    The JSON is written last and records the tensor file's sha256, so a crash between the
    two writes leaves a checkpoint that :func:`load_checkpoint` rejects rather than trusts.

    Args:
        directory: Folder for the two files (created).
        checkpoint: The state to save.

    Returns:
        Path of the JSON file.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for group, values in (
        ("adapter", checkpoint.adapter),
        ("global", checkpoint.global_adapter),
        ("optim", checkpoint.optimizer),
        ("rng", checkpoint.rng),
    ):
        for key, value in values.items():
            # safetensors wants contiguous tensors and no 0-dim quirks; shapes go in the JSON.
            tensors[f"{group}/{key}"] = value.detach().to("cpu").contiguous().reshape(-1).clone()
    tmp = directory / (CHECKPOINT_TENSORS + ".tmp")
    save_file(tensors, str(tmp))
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, directory / CHECKPOINT_TENSORS)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "round": checkpoint.round_num,
        "step": checkpoint.step,
        "params": checkpoint.params,
        "adapter_keys": list(checkpoint.adapter),
        "global_keys": list(checkpoint.global_adapter),
        "optimizer_keys": list(checkpoint.optimizer),
        "rng_keys": list(checkpoint.rng),
        "shapes": {
            "adapter": {k: list(v.shape) for k, v in checkpoint.adapter.items()},
            "global": {k: list(v.shape) for k, v in checkpoint.global_adapter.items()},
            "optim": {k: list(v.shape) for k, v in checkpoint.optimizer.items()},
            "rng": {k: list(v.shape) for k, v in checkpoint.rng.items()},
        },
        "losses": list(checkpoint.losses),
        "grad_norms": list(checkpoint.grad_norms),
        "step_seconds": list(checkpoint.step_seconds),
        "answer_tokens": checkpoint.answer_tokens,
        "tensors_sha256": digest,
        "saved_at": time.time(),
    }
    json_tmp = directory / (CHECKPOINT_JSON + ".tmp")
    json_tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    os.replace(json_tmp, directory / CHECKPOINT_JSON)
    return directory / CHECKPOINT_JSON


def load_checkpoint(directory: str | Path) -> TrainCheckpoint | None:
    """Read a checkpoint written by :func:`save_checkpoint`.

    Args:
        directory: The checkpoint folder.

    Returns:
        The checkpoint, or ``None`` if the folder holds none.

    Raises:
        RunStateError: The files are incomplete, corrupt or of an unknown format.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, tensor_path = directory / CHECKPOINT_JSON, directory / CHECKPOINT_TENSORS
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise RunStateError(f"{meta_path}: unknown checkpoint format {meta.get('format')!r}")
        raw = tensor_path.read_bytes()
        if hashlib.sha256(raw).hexdigest() != meta["tensors_sha256"]:
            raise RunStateError(f"{tensor_path} does not match {meta_path} (interrupted write?); delete both")
        flat = load_file(str(tensor_path))
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for group, keys in (
            ("adapter", meta["adapter_keys"]),
            ("global", meta["global_keys"]),
            ("optim", meta["optimizer_keys"]),
            ("rng", meta["rng_keys"]),
        ):
            groups[group] = {k: flat[f"{group}/{k}"].reshape(meta["shapes"][group][k]) for k in keys}
        return TrainCheckpoint(
            round_num=int(meta["round"]),
            step=int(meta["step"]),
            params=dict(meta["params"]),
            adapter=groups["adapter"],
            global_adapter=groups["global"],
            optimizer=groups["optim"],
            rng=groups["rng"],
            losses=tuple(float(x) for x in meta["losses"]),
            grad_norms=tuple(float(x) for x in meta["grad_norms"]),
            step_seconds=tuple(float(x) for x in meta["step_seconds"]),
            answer_tokens=int(meta["answer_tokens"]),
        )
    except (OSError, KeyError, TypeError, ValueError, SafetensorError, RuntimeError) as exc:
        if isinstance(exc, RunStateError):
            raise
        raise RunStateError(f"checkpoint in {directory} is unreadable ({exc!r}); delete it to start the round afresh") from exc


def clear_checkpoint(directory: str | Path) -> None:
    """Delete a checkpoint (after its round's update was sent)."""
    for name in (CHECKPOINT_JSON, CHECKPOINT_TENSORS, CHECKPOINT_JSON + ".tmp", CHECKPOINT_TENSORS + ".tmp"):
        (Path(directory) / name).unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Training


def proximal_term(adapter: Mapping[str, torch.Tensor], global_adapter: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``||theta - theta_global||^2`` over the adapter tensors (float32 scalar).

    Args:
        adapter: Current LoRA tensors.
        global_adapter: The round's starting tensors, same keys and shapes.

    Returns:
        The squared distance, differentiable in ``adapter``.
    """
    total = torch.zeros((), dtype=torch.float32, device=next(iter(adapter.values())).device)
    for key, p in adapter.items():
        total = total + (p.float() - global_adapter[key]).pow(2).sum()
    return total


def train_adapter(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: LocalDataset,
    params: TrainingParams,
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
    device: str | torch.device,
    progress_cb: Callable[[TrainProgress], None] | None = None,
    resume_state: TrainCheckpoint | None = None,
    *,
    round_num: int = 0,
    gradient_checkpointing: bool = False,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 0,
    max_grad_norm: float | None = 1.0,
) -> TrainResult:
    """Train a LoRA adapter for one round and return its delta from the global adapter.

    Deterministic given ``params.seed`` and ``round_num`` (batches, dropout, and the initial
    adapter when there is no global one). The base model comes back without LoRA layers,
    with its train/eval mode and ``requires_grad`` flags as they were; 4-bit models keep the
    fp32 norms ``prepare_model_for_kbit_training`` gave them.

    Args:
        model: The client's sub-LLM (plain or bitsandbytes 4-bit), bare (no PEFT adapter).
        tokenizer: Its tokenizer.
        dataset: The local dataset (n_c = ``len(dataset)``).
        params: The round's TrainingParams (local_steps, learning_rate, batch_size, seq_len,
            lora_rank, lora_alpha, lora_dropout, target_modules, mu, seed).
        global_adapter: Canonical-key LoRA tensors to start from; keys of full-LLM layers this
            sub-LLM lacks are ignored. ``None``: a fresh init seeded per canonical key, so all
            tiers agree on it.
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list (e.g. ``"model.layers"``).
        device: Where to train. A plain model is moved there; a 4-bit model must already be.
        progress_cb: Called with a :class:`TrainProgress` after every step; an exception
            from it aborts training (the last checkpoint stays on disk).
        resume_state: A checkpoint of this round to carry on from.
        round_num: The round number (seeds the round and is stored in checkpoints).
        gradient_checkpointing: Trade compute for activation memory.
        checkpoint_dir: Where to save mid-round checkpoints (``None``: never).
        checkpoint_every: Save after every this many steps (0: never).
        max_grad_norm: Clip the adapter gradient norm to this (``None``: no clipping).

    Returns:
        The :class:`TrainResult`.

    Raises:
        DataError: The dataset is empty.
        ModelError: LoRA cannot be attached, the global adapter does not fit, the 4-bit model
            is on another device, or the loss became NaN/Inf (lower the learning rate).
        RunStateError: ``resume_state`` belongs to another round or other params.
    """
    if len(dataset) == 0:
        raise DataError(f"{dataset.source}: no examples to train on")
    if params.objective == "label_words" and dataset.task is None:
        raise DataError(
            f"{dataset.source}: the run trains with objective 'label_words', which needs classification "
            "data (text,label); this dataset is generation data (prompt,answer)"
        )
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    current = _model_device(model)
    if current != device:
        if is_4bit(model):
            raise ModelError(f"the 4-bit model is on {current} but training was asked on {device}; load it there")
        model.to(device)
    if resume_state is not None:
        _check_resume(resume_state, params, round_num)
    seed = round_seed(int(params.seed), round_num)
    torch.manual_seed(seed)

    was_training = model.training
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    peft_model = None
    try:
        peft_model = attach_lora(model, params, gradient_checkpointing=gradient_checkpointing)
        if use_cache is not None:
            model.config.use_cache = False  # the KV cache is useless in training and costs memory
        adapter = adapter_parameters(peft_model)
        if resume_state is not None:
            start = resume_state.global_adapter
            if set(start) != set(adapter) or set(resume_state.adapter) != set(adapter):
                raise RunStateError("the checkpoint holds another LoRA layout than this model's; discard it")
            if global_adapter is not None and not _same_start(start, global_adapter, layer_map, layers_prefix):
                raise RunStateError("the checkpoint started from a different global adapter than this round's; discard it")
            with torch.no_grad():
                for key, p in adapter.items():
                    p.copy_(resume_state.adapter[key].to(dtype=p.dtype, device=p.device))
            theta_global = {k: v.to(device=device, dtype=torch.float32) for k, v in start.items()}
        else:
            _load_start(adapter, global_adapter, layer_map, layers_prefix, int(params.seed))
            theta_global = {k: p.detach().float().clone() for k, p in adapter.items()}
        return _train_loop(
            peft_model,
            tokenizer,
            dataset,
            params,
            adapter,
            theta_global,
            layer_map,
            layers_prefix,
            device,
            progress_cb,
            resume_state,
            round_num=round_num,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            checkpoint_every=checkpoint_every,
            max_grad_norm=max_grad_norm,
        )
    finally:
        # Leave the caller's model as it came, whether training finished, failed or was cut off.
        if peft_model is not None:
            detach_lora(peft_model)
        else:
            _disable_checkpointing(model)
        if use_cache is not None:
            model.config.use_cache = use_cache
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        model.train(was_training)


def _same_start(
    start: Mapping[str, torch.Tensor], global_adapter: Mapping[str, torch.Tensor], layer_map: Sequence[int], layers_prefix: str
) -> bool:
    sub = to_sub_keys(global_adapter, layer_map, layers_prefix)
    return set(sub) == set(start) and all(torch.equal(sub[k].float().cpu(), start[k].float().cpu()) for k in start)


def _check_resume(state: TrainCheckpoint, params: TrainingParams, round_num: int) -> None:
    if state.round_num != round_num:
        raise RunStateError(f"the checkpoint is of round {state.round_num}, not round {round_num}; discard it")
    if state.params != params_dict(params):
        raise RunStateError("the checkpoint was trained with other TrainingParams than this round's; discard it")
    if not 0 <= state.step <= int(params.local_steps):
        raise RunStateError(f"the checkpoint is at step {state.step}, outside 0..{params.local_steps}")


def label_word_loss(logits: torch.Tensor, labels: torch.Tensor, choices: torch.Tensor, label_word_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the label words at the answer position (the ``label_words`` objective).

    Args:
        logits: ``[B, T, V]`` model outputs.
        labels: ``[B, T]`` token labels, ``IGNORE_INDEX`` before the answer (as :func:`make_batch` builds).
        choices: ``[B]`` index of each example's label in ``label_word_ids``.
        label_word_ids: ``[K]`` first token of each label's answer.

    Returns:
        The mean loss (a scalar).
    """
    # The logits that predict the first answer token sit one position before it.
    answer_start = (labels != IGNORE_INDEX).int().argmax(dim=1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    scores = logits[rows, answer_start - 1][:, label_word_ids].float()
    return torch.nn.functional.cross_entropy(scores, choices)


def _train_loop(
    peft_model: torch.nn.Module,
    tokenizer: Any,
    dataset: LocalDataset,
    params: TrainingParams,
    adapter: dict[str, torch.nn.Parameter],
    theta_global: dict[str, torch.Tensor],
    layer_map: Sequence[int],
    layers_prefix: str,
    device: torch.device,
    progress_cb: Callable[[TrainProgress], None] | None,
    resume_state: TrainCheckpoint | None,
    *,
    round_num: int,
    seed: int,
    checkpoint_dir: str | Path | None,
    checkpoint_every: int,
    max_grad_norm: float | None,
) -> TrainResult:
    trainable = list(adapter.values())
    # No weight decay: it would pull LoRA towards zero, the proximal term pulls it towards the
    # global adapter, which is the regulariser the method asks for.
    optimizer = torch.optim.AdamW(trainable, lr=float(params.learning_rate), weight_decay=0.0)
    mu = float(params.mu)
    losses: list[float] = []
    grad_norms: list[float] = []
    step_seconds: list[float] = []
    answer_tokens = 0
    start_step = 0
    if resume_state is not None:
        _restore_optimizer(optimizer, resume_state.optimizer, device)
        _set_rng_state(resume_state.rng, device)
        losses, grad_norms = list(resume_state.losses), list(resume_state.grad_norms)
        step_seconds, answer_tokens = list(resume_state.step_seconds), resume_state.answer_tokens
        start_step = resume_state.step
        log.info("resuming round %d at step %d of %d", round_num, start_step, params.local_steps)
    prox_value = 0.0
    label_word_ids = None
    if params.objective == "label_words":
        label_word_ids = torch.tensor(dataset.task.first_answer_tokens(tokenizer), device=device)
    peft_model.train()
    total_steps = int(params.local_steps)
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        indices = batch_indices(len(dataset), int(params.batch_size), seed, step)
        batch = {k: v.to(device) for k, v in make_batch(dataset, tokenizer, indices, int(params.seq_len)).items()}
        if label_word_ids is None:
            task_loss = peft_model(**batch).loss
        else:
            choices = torch.tensor([dataset.examples[i].label for i in indices], device=device)
            logits = peft_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            task_loss = label_word_loss(logits, batch["labels"], choices, label_word_ids)
        prox = proximal_term(adapter, theta_global)
        loss = task_loss.float() + 0.5 * mu * prox
        if not torch.isfinite(loss):
            raise ModelError(
                f"the training loss became {loss.item()} at step {step + 1} of round {round_num}; "
                f"lower the learning rate (now {params.learning_rate})"
            )
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm if max_grad_norm is not None else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        losses.append(float(task_loss.detach()))
        grad_norms.append(float(norm))
        step_seconds.append(seconds)
        prox_value = float(prox.detach())
        answer_tokens += int((batch["labels"][:, 1:] != -100).sum())
        done = step + 1
        if checkpoint_dir is not None and checkpoint_every > 0 and done % checkpoint_every == 0 and done < total_steps:
            save_checkpoint(
                checkpoint_dir,
                TrainCheckpoint(
                    round_num=round_num,
                    step=done,
                    params=params_dict(params),
                    adapter={k: p.detach() for k, p in adapter.items()},
                    global_adapter=theta_global,
                    optimizer=_optimizer_tensors(optimizer, len(trainable)),
                    rng=_rng_state(device),
                    losses=tuple(losses),
                    grad_norms=tuple(grad_norms),
                    step_seconds=tuple(step_seconds),
                    answer_tokens=answer_tokens,
                ),
            )
        if progress_cb is not None:
            progress_cb(TrainProgress(step=done, total_steps=total_steps, loss=losses[-1], prox=prox_value, seconds=seconds))

    with torch.no_grad():
        sub_delta = {k: (p.detach().float() - theta_global[k]).cpu() for k, p in adapter.items()}
    delta = to_full_keys(sub_delta, layer_map, layers_prefix)
    delta_norm = math.sqrt(sum(float(v.pow(2).sum()) for v in delta.values()))
    metrics = {
        "prox_last": prox_value,
        "steps": float(len(losses)),
        "resumed_from_step": float(start_step),
        "step_seconds_mean": sum(step_seconds) / len(step_seconds) if step_seconds else 0.0,
        "answer_tokens": float(answer_tokens),
        "delta_norm": delta_norm,
        "learning_rate": float(params.learning_rate),
        "mu": mu,
    }
    if losses:  # a zero-step round has no loss to report (and NaN would fail validation)
        metrics.update(
            loss_first=losses[0],
            loss_last=losses[-1],
            loss_mean=sum(losses) / len(losses),
            grad_norm_first=grad_norms[0],
            grad_norm_last=grad_norms[-1],
        )
    return TrainResult(delta=delta, num_examples=len(dataset), metrics=metrics)
