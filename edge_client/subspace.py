"""FedKRSO's client half: full-parameter tuning of the (sub-)LLM inside shared random subspaces.

A FedKRSO round (``params.subspace_seeds`` non-empty, see :mod:`shared.subspace`) trains,
for every target weight matrix ``W`` (``d_out x d_in``) of the decoder layers and every seed
``s`` of the round, the coordinates ``B_s`` (``d_out x r``, starting at zero) of the update
``B_s @ P_s``, where ``P_s`` is the seed's random projection of that matrix. The model the
round trains is

    W + sum over the history of B_h @ P_h + sum over this round's seeds of B_s @ P_s

(the history: the coordinates of all past rounds, the global state the coordinator sends).
:func:`subspaces_for_training` puts a :class:`SubspaceLinear` around every target module
for the ``with`` block, which computes that as ``base(x) + (x @ A^T) @ B^T`` with ``A`` the
stacked projections and ``B`` the stacked coordinates: no dense ``d_out x d_in`` update is
ever formed, and a 4-bit weight is never touched. On exit the original modules are put back
and the model is as it was found (:func:`edge_client.lora.kept_as_found`).

Projections are seeded by the CANONICAL module key (full-LLM layer numbers), so a sub-LLM's
layer ``i`` trains in the same subspace as full-LLM layer ``layer_map[i]`` does on every other
tier, and the coordinator rebuilds the update with :func:`shared.subspace.rebuild`.

FedKRSO's client updates one subspace per step: :func:`active_seed` picks which, and
:mod:`edge_client.trainer` drops the other seeds' gradients before the optimizer step.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from edge_client.lora import check_bare, kept_as_found, prepare_for_training
from shared.adapters import PEFT_PREFIX, layer_index, to_full_keys, to_sub_keys
from shared.errors import ModelError, TensorError
from shared.subspace import (
    SEED_BITS,
    coordinate_key,
    is_coordinate_key,
    projection,
    split_key,
)

if TYPE_CHECKING:
    from shared.protocol import TrainingParams

MAX_SEEDS = 64
"""Most subspaces one round may train (each one costs a projection per target matrix)."""

MAX_RANK = 65_536
"""Largest subspace rank a round may ask for."""


class SubspaceLinear(nn.Module):
    """A frozen linear layer plus its low-rank update in random subspaces.

    ``forward(x) = base(x) + ((x.float() @ A^T) @ B^T)`` cast to the base output's dtype,
    with ``A`` (``R x d_in``) the stacked projections of the history and of this round's
    seeds and ``B`` (``d_out x R``) the history's coordinates next to this round's trainable
    ones. Everything in ``A`` and ``B`` is float32, whatever the base's dtype (4-bit included).

    Attributes:
        base: The original module (``nn.Linear`` or bitsandbytes ``Linear4bit``), unchanged.
        projections: Buffer ``A``: history projections first, then one ``r x d_in`` block per seed.
        history: Buffer, the history's coordinates (``d_out x R_history``, possibly 0 wide).
        coordinates: This round's trainable ``d_out x r`` coordinates, one per seed, in seed order.
    """

    def __init__(self, base: nn.Linear, projections: torch.Tensor, history: torch.Tensor, coordinates: Sequence[nn.Parameter]):
        super().__init__()
        self.base = base
        # Not persistent: the wrapper lives for one round and must not leak into a state dict.
        self.register_buffer("projections", projections, persistent=False)
        self.register_buffer("history", history, persistent=False)
        self.coordinates = nn.ParameterList(coordinates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus the subspace update of ``x``."""
        out = self.base(x)
        b = torch.cat([self.history, *self.coordinates], dim=1)
        update = (x.float() @ self.projections.T) @ b.T
        return out + update.to(out.dtype)


@dataclass(frozen=True)
class Subspaces:
    """A model prepared for one FedKRSO round by :func:`subspaces_for_training`.

    Attributes:
        model: The client's model, its target modules wrapped in :class:`SubspaceLinear`.
        coordinates: This round's trainable coordinates, sub-LLM coordinate key -> ``B``
            (float32 ``d_out x r`` parameters, zero at the start), in module then seed order.
        seed_keys: ``seed_keys[k]``: the keys of :attr:`coordinates` along seed ``k`` of the round.
    """

    model: nn.Module
    coordinates: dict[str, nn.Parameter]
    seed_keys: tuple[frozenset[str], ...]


def subspace_params_problem(params: TrainingParams) -> str | None:
    """What is wrong with a round's subspace parameters, or ``None`` if they can be trained.

    A LoRA round (no seeds) is never a problem. Shared by the trainer (which raises
    :class:`~shared.errors.ModelError`) and the inbound schedule check.
    """
    seeds = list(params.subspace_seeds)
    if not seeds:
        return None
    rank = params.subspace_rank
    if not 1 <= rank <= MAX_RANK:
        return f"a FedKRSO round needs subspace_rank in 1..{MAX_RANK}, got {rank}"
    if len(seeds) > MAX_SEEDS:
        return f"a FedKRSO round may train at most {MAX_SEEDS} subspaces, got {len(seeds)} seeds"
    if len(set(seeds)) != len(seeds):
        return f"the round's subspace seeds repeat: {sorted(s for s in set(seeds) if seeds.count(s) > 1)[:5]}"
    # Coordinate keys carry the seed as up to 15 decimal digits (shared.subspace).
    bad = [s for s in seeds if not 0 <= s < 2**SEED_BITS]
    if bad:
        return f"subspace seeds must lie in [0, 2**{SEED_BITS}), got {bad[:3]}"
    return None


def active_seed(round_seed: int, step: int, count: int) -> int:
    """Which of the round's ``count`` seeds local step ``step`` updates (FedKRSO: one per step).

    Steps go in cycles of ``count``; each cycle visits every seed once, in an order drawn from
    ``round_seed`` and the cycle. So every seed gets its share of the steps, the choice is
    uniform, and a resumed round picks the same seeds. Pure integer hashing, so it draws
    nothing from (and does not disturb) the torch RNG the batches and dropout use.

    Args:
        round_seed: The round's seed (:func:`edge_client.trainer.round_seed`).
        step: The local step, from 0.
        count: K, the round's number of seeds (>= 1).
    """
    cycle, position = divmod(int(step), int(count))

    def rank(k: int) -> bytes:
        return hashlib.sha256(f"fedkrso-active/{int(round_seed)}/{cycle}/{k}".encode()).digest()

    return sorted(range(count), key=rank)[position]


def target_linears(model: nn.Module, target_modules: Sequence[str], layers_prefix: str) -> dict[str, nn.Linear]:
    """The target modules of the decoder layers: module path -> module (as PEFT's LoRA picks them).

    Args:
        model: The (sub-)LLM.
        target_modules: Module names (last dotted component), e.g. ``["q_proj", "v_proj"]``.
        layers_prefix: Dotted path of the decoder layer list.

    Raises:
        ModelError: None found, or one that is no linear layer.
    """
    names = set(target_modules)
    out: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] not in names or layer_index(name, layers_prefix) is None:
            continue
        if isinstance(module, SubspaceLinear):
            raise ModelError(f"{name} is already wrapped for subspace training; pass the bare (sub-)LLM")
        if not isinstance(module, nn.Linear):
            raise ModelError(f"target module {name} is a {type(module).__name__}; subspace training needs linear layers")
        out[name] = module
    if not out:
        raise ModelError(f"no target module {sorted(names)} inside the decoder layers {layers_prefix}.<i>")
    return out


def _history(
    global_adapter: Mapping[str, torch.Tensor] | None,
    targets: Mapping[str, nn.Linear],
    layer_map: Sequence[int],
    layers_prefix: str,
) -> dict[str, list[tuple[int, torch.Tensor]]]:
    """The history's coordinates per target module path: ``[(seed, B), ...]``, validated."""
    history: dict[str, list[tuple[int, torch.Tensor]]] = {name: [] for name in targets}
    if not global_adapter:
        return history
    wrong = [k for k in global_adapter if not is_coordinate_key(k)]
    if wrong:
        raise ModelError(
            f"the global state of a FedKRSO round must hold subspace coordinates only, got {wrong[:3]} "
            f"({len(wrong)} keys that are not <module>.krso.<seed>); is the run's method LoRA?"
        )
    # Keys of full-LLM layers this sub-LLM lacks drop out here, as in load_start.
    for key, value in to_sub_keys(global_adapter, layer_map, layers_prefix).items():
        module, seed = split_key(key)
        name = module[len(PEFT_PREFIX) :]
        if name not in targets:
            raise ModelError(f"the global state holds coordinates of {module}, which is no target module of this round")
        d_out = targets[name].out_features
        if value.dim() != 2 or value.shape[0] != d_out or value.shape[1] < 1:
            raise ModelError(f"global coordinates {key} have shape {tuple(value.shape)}; {module} needs ({d_out}, rank)")
        if not torch.isfinite(value).all():
            raise ModelError(f"global coordinates {key} hold NaN or Inf")
        history[name].append((seed, value.detach().to(torch.float32)))
    return history


def _canonical_module(name: str, layer_map: Sequence[int], layers_prefix: str) -> str:
    """The full-LLM module key of sub-LLM module path ``name`` (what seeds its projections)."""
    try:
        (canonical,) = to_full_keys({PEFT_PREFIX + name: torch.empty(0)}, layer_map, layers_prefix)
    except TensorError as exc:
        raise ModelError(f"the model does not fit its layer map: {exc}") from exc
    return canonical


@contextmanager
def subspaces_for_training(
    model: nn.Module,
    params: TrainingParams,
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
    *,
    gradient_checkpointing: bool = False,
) -> Iterator[Subspaces]:
    """Wrap every target module for one FedKRSO round for the ``with`` block, then unwrap.

    Everything is checked before the model is touched. Then the base is frozen
    (:func:`edge_client.lora.prepare_for_training`) and each target gets a
    :class:`SubspaceLinear` holding the history and one zero coordinate matrix per seed of
    ``params.subspace_seeds``. On exit, whether the block finished, raised or was cut off,
    the original module objects are put back and the model's mode, ``requires_grad`` flags
    and KV-cache setting are restored (:func:`edge_client.lora.kept_as_found`).

    Args:
        model: The bare (sub-)LLM (plain or bitsandbytes 4-bit), on the training device.
        params: The round's TrainingParams (``subspace_seeds``, ``subspace_rank``, ``target_modules``).
        global_adapter: The history: canonical coordinate keys -> ``B`` (``d_out x r``) of all
            past rounds; ``None`` or empty before the first aggregation. Keys of full-LLM
            layers this sub-LLM lacks are ignored.
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list.
        gradient_checkpointing: Recompute activations in backward to save memory.

    Yields:
        The :class:`Subspaces` to train.

    Raises:
        ModelError: Bad subspace parameters (:func:`subspace_params_problem`), no target module,
            a PEFT-wrapped model, 4-bit weights in the CPU inference layout, or a history
            key or tensor that does not fit (not a coordinate key, another target, wrong
            shape, NaN/Inf).
    """
    problem = subspace_params_problem(params)
    if problem is not None:
        raise ModelError(problem)
    if not params.subspace_seeds:
        raise ModelError("a FedKRSO round needs at least one subspace seed")
    check_bare(model)
    seeds = [int(s) for s in params.subspace_seeds]
    rank = int(params.subspace_rank)
    targets = target_linears(model, params.target_modules, layers_prefix)
    history = _history(global_adapter, targets, layer_map, layers_prefix)
    canonical = {name: _canonical_module(name, layer_map, layers_prefix) for name in targets}
    with kept_as_found(model):
        prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
        wrapped: dict[str, SubspaceLinear] = {}
        try:
            coordinates: dict[str, nn.Parameter] = {}
            seed_keys: list[set[str]] = [set() for _ in seeds]
            for name, base in targets.items():
                device = base.weight.device
                d_in, d_out = int(base.in_features), int(base.out_features)
                past = history[name]
                a = torch.cat(
                    [projection(s, canonical[name], int(b.shape[1]), d_in) for s, b in past]
                    + [projection(s, canonical[name], rank, d_in) for s in seeds]
                ).to(device)
                b_past = torch.cat([b for _, b in past], dim=1) if past else torch.zeros(d_out, 0)
                params_k = [nn.Parameter(torch.zeros(d_out, rank, device=device)) for _ in seeds]
                for k, (seed, p) in enumerate(zip(seeds, params_k, strict=True)):
                    key = coordinate_key(PEFT_PREFIX + name, seed)
                    coordinates[key] = p
                    seed_keys[k].add(key)
                wrapper = SubspaceLinear(base, a, b_past.to(device), params_k)
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, wrapper)
                wrapped[name] = wrapper
            yield Subspaces(model=model, coordinates=coordinates, seed_keys=tuple(frozenset(s) for s in seed_keys))
        finally:
            for name, wrapper in wrapped.items():
                parent_name, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent_name), child, wrapper.base)
