"""Checkpoints of an interrupted round of local training, and the checks before resuming one.

A checkpoint holds the adapter after ``step`` optimizer steps, the global adapter the round
started from, AdamW's moments and the RNG state in one safetensors file, plus a JSON
sidecar with everything else (:class:`TrainCheckpoint`). Resuming from one gives the same
result, bit for bit on CPU, as a run that never stopped. Nothing here unpickles anything.

:mod:`edge_client.trainer` saves one every ``checkpoint_every`` steps and resumes from one
that passes :func:`check_resume` and :func:`check_resume_start`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.adapters import to_sub_keys
from shared.errors import RunStateError

if TYPE_CHECKING:
    from shared.protocol import TrainingParams

CHECKPOINT_TENSORS = "train_state.safetensors"
CHECKPOINT_JSON = "train_state.json"
CHECKPOINT_FORMAT = 1


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


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The RNG states a resumed round needs to draw the same batches and dropout masks.

    Args:
        device: The training device (its CUDA generator is included when it is a GPU).

    Returns:
        ``{"cpu": ...}`` and, on CUDA, ``"cuda"``: uint8 state tensors.
    """
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Restore RNG states from :func:`rng_state` (the CUDA one only when training on CUDA)."""
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def optimizer_tensors(optimizer: torch.optim.Optimizer, n_params: int) -> dict[str, torch.Tensor]:
    """The optimizer's per-parameter state as flat CPU tensors, for a checkpoint.

    Args:
        optimizer: The round's AdamW over the adapter parameters.
        n_params: How many parameters it holds.

    Returns:
        ``{"<i>.<name>": tensor}`` (``i``: parameter index; plain numbers become 0-dim tensors).
    """
    out = {}
    state = optimizer.state_dict()["state"]
    for i in range(n_params):
        for name, value in state.get(i, {}).items():
            tensor = value if torch.is_tensor(value) else torch.tensor(float(value))
            out[f"{i}.{name}"] = tensor.detach().to("cpu").clone()
    return out


def restore_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
    """Load the state :func:`optimizer_tensors` saved into a fresh optimizer of the same parameters.

    Args:
        optimizer: The new AdamW, over the adapter parameters in checkpoint order.
        tensors: A checkpoint's :attr:`TrainCheckpoint.optimizer`.
        device: Where the parameters (and so the moments) live.
    """
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


def check_resume(state: TrainCheckpoint, params: TrainingParams, round_num: int) -> None:
    """Refuse a checkpoint of another round, other params, or a step outside the round.

    Args:
        state: The checkpoint to resume from.
        params: This round's TrainingParams.
        round_num: This round's number.

    Raises:
        RunStateError: It does not belong to this round as configured now.
    """
    if state.round_num != round_num:
        raise RunStateError(f"the checkpoint is of round {state.round_num}, not round {round_num}; discard it")
    if state.params != params_dict(params):
        raise RunStateError("the checkpoint was trained with other TrainingParams than this round's; discard it")
    if not 0 <= state.step <= int(params.local_steps):
        raise RunStateError(f"the checkpoint is at step {state.step}, outside 0..{params.local_steps}")


def check_resume_start(
    state: TrainCheckpoint,
    adapter_keys: Iterable[str],
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
) -> None:
    """Refuse a checkpoint whose LoRA layout or starting adapter is not this round's.

    Args:
        state: The checkpoint to resume from.
        adapter_keys: Sub-LLM keys of the LoRA parameters just attached.
        global_adapter: This round's canonical-key global adapter (``None``: none yet, so
            any fresh start fits).
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list.

    Raises:
        RunStateError: Other LoRA tensors, or another global adapter than this round's.
    """
    keys = set(adapter_keys)
    start = state.global_adapter
    if set(start) != keys or set(state.adapter) != keys:
        raise RunStateError("the checkpoint holds another LoRA layout than this model's; discard it")
    if global_adapter is None:
        return
    sub = to_sub_keys(global_adapter, layer_map, layers_prefix)
    same = set(sub) == set(start) and all(torch.equal(sub[k].float().cpu(), start[k].float().cpu()) for k in start)
    if not same:
        raise RunStateError("the checkpoint started from a different global adapter than this round's; discard it")
