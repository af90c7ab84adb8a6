"""What the coordinator does differently when clients send FedKRSO coordinates instead of LoRA.

A method's ``update_form`` (:mod:`coordinator.model.methods`) is ``"lora"`` or
``"subspace"``. Everything else of a round (validation, FedAvg per key, checkpoints, the
retained global state) is the same code for both, because coordinates are just more keyed
tensors. What differs is here, in one place:

* :func:`round_training`: the round's training parameters (FedKRSO: this round's seeds
  and the subspace rank);
* :func:`coordinate_shapes`: the keys and shapes a client of a tier must send;
* :func:`lora_view`: the global state as a PEFT LoRA adapter, which is what export,
  evaluation and the per-round curve load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from coordinator.model.methods import Method
from coordinator.model.surgery import find_decoder_layers
from shared.adapters import PEFT_PREFIX, LoraSettings, layer_index
from shared.protocol import TrainingParams
from shared.subspace import as_lora, coordinate_key, round_seeds


def round_training(method: Method, training: TrainingParams, subspace: object, run_seed: int, round_num: int) -> TrainingParams:
    """The training parameters the schedule of ``round_num`` carries.

    Args:
        method: The run's method.
        training: The configured ``[training]`` parameters.
        subspace: The run's :class:`coordinator.settings.SubspaceSettings`.
        run_seed: The run's seed (the seeds are a pure function of it and the round, so a
            resumed coordinator sends the same ones).
        round_num: The round.

    Returns:
        ``training`` itself for a LoRA method; for FedKRSO, with the round's
        ``subspace_seeds`` and the ``subspace_rank``.
    """
    if method.update_form != "subspace":
        return training
    return dataclasses.replace(
        training,
        subspace_rank=int(subspace.rank),  # type: ignore[attr-defined]
        subspace_seeds=round_seeds(run_seed, round_num, int(subspace.seeds_per_round)),  # type: ignore[attr-defined]
    )


def target_matrices(model: nn.Module, target_modules: Iterable[str]) -> dict[str, tuple[int, int]]:
    """Every target weight matrix of the decoder layers: PEFT-style module key -> ``(d_out, d_in)``.

    Args:
        model: The full LLM (any device, or the meta device).
        target_modules: Module names to tune (``training.target_modules``).
    """
    prefix, _ = find_decoder_layers(model)
    targets = set(target_modules)
    out: dict[str, tuple[int, int]] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in targets and layer_index(name, prefix) is not None:
            out[f"{PEFT_PREFIX}{name}"] = (int(module.out_features), int(module.in_features))
    return out


def coordinate_shapes(
    matrices: Mapping[str, tuple[int, int]], layers: Iterable[int], layers_prefix: str, training: TrainingParams
) -> dict[str, tuple[int, ...]]:
    """The coordinate keys and shapes a FedKRSO client adapting ``layers`` sends in a round.

    Args:
        matrices: From :func:`target_matrices`.
        layers: Full-LLM layers the client's tier adapts.
        layers_prefix: Dotted path of the decoder layer list.
        training: The round's parameters (:func:`round_training`).

    Returns:
        Canonical coordinate key -> ``(d_out, subspace_rank)``.
    """
    held = set(layers)
    return {
        coordinate_key(module, seed): (d_out, int(training.subspace_rank))
        for module, (d_out, _d_in) in matrices.items()
        if layer_index(module, layers_prefix) in held
        for seed in training.subspace_seeds
    }


def lora_view(
    method: Method,
    global_state: Mapping[str, torch.Tensor],
    lora: LoraSettings,
    matrices: Mapping[str, tuple[int, int]],
) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """The global state as a LoRA adapter and the settings that load it.

    Args:
        method: The run's method.
        global_state: The global adapter (LoRA) or accumulated coordinates (FedKRSO).
        lora: The run's LoRA settings.
        matrices: From :func:`target_matrices` (FedKRSO rebuilds each projection with its ``d_in``).

    Returns:
        ``(state, settings)``: for a LoRA method the state and ``lora`` as they are; for
        FedKRSO the stacked projections and coordinates (:func:`shared.subspace.as_lora`).
    """
    if method.update_form != "subspace":
        return dict(global_state), lora
    return as_lora(global_state, lambda module: matrices[module][1], lora.target_modules)
