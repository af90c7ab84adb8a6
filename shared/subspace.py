"""FedKRSO's shared random subspaces: seeds, projections, keys, and the rebuilt update.

In FedKRSO (``method = "fedkrso"``) every round the coordinator draws ``K`` seeds
(:func:`round_seeds`). For each adapted weight matrix ``W`` (``d_out x d_in``) and each seed
``s``, the seed names a random projection ``P_s`` (``r x d_in``, :func:`projection`); a
client trains only the coordinates ``B_s`` (``d_out x r``, starting at zero) of the update
``sum_s B_s @ P_s`` and uploads them. The update of a matrix is linear in its coordinates,
so the coordinator averages coordinates per key exactly as FedAvg averages LoRA tensors, and
the average of the rebuilt updates is the rebuild of the averaged coordinates.

The model after ``T`` rounds is ``W + sum over every (round, seed) of B_s @ P_s``: a 4-bit
weight is never touched, the update stays in this low-rank coordinate form, and stacking
the projections and coordinates gives exactly a LoRA adapter of rank ``r * K * T`` with
scaling 1 (:func:`as_lora`), which PEFT loads on the full model.

Coordinate keys are the canonical full-LLM module path with the seed in it,
``base_model.model.model.layers.17.self_attn.q_proj.krso.123456789`` (:func:`coordinate_key`),
so the layer renumbering of :mod:`shared.adapters` applies unchanged and the global state is
self-describing: its keys say which projections to rebuild.

Projections are made from integer arithmetic only (SplitMix64 over a counter, one sign bit
per entry), never from a framework RNG, so the same seed gives bit-identical projections on
any CPU, GPU, library version or platform.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from shared.adapters import PEFT_PREFIX, LoraSettings
from shared.errors import TensorError

MARKER = ".krso."
"""Separates the module path from the seed in a coordinate key."""

SEED_BITS = 48
"""Seeds are below ``2**48``: exact in msgpack, JSON and float64 alike."""

_KEY_RE = re.compile(r"^(?P<module>.+)\.krso\.(?P<seed>\d{1,15})$")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def coordinate_key(module: str, seed: int) -> str:
    """The key of module ``module``'s coordinates along seed ``seed``.

    Args:
        module: The PEFT-style module key, ``base_model.model.<module path>``.
        seed: The subspace seed.
    """
    return f"{module}{MARKER}{int(seed)}"


def split_key(key: str) -> tuple[str, int]:
    """``(module, seed)`` of a coordinate key.

    Raises:
        TensorError: ``key`` is not a coordinate key.
    """
    match = _KEY_RE.fullmatch(key)
    if match is None or not key.startswith(PEFT_PREFIX):
        raise TensorError(f"{key!r} is not a subspace coordinate key ({PEFT_PREFIX}<module>{MARKER}<seed>)")
    return match.group("module"), int(match.group("seed"))


def is_coordinate_key(key: str) -> bool:
    """Whether ``key`` names subspace coordinates (not a LoRA tensor)."""
    return key.startswith(PEFT_PREFIX) and _KEY_RE.fullmatch(key) is not None


def round_seeds(run_seed: int, round_num: int, count: int) -> list[int]:
    """The ``count`` subspace seeds of a round: a pure function of the run's seed and the round,
    so a resumed coordinator draws the same ones and no two rounds share one (but by a 2**-48 chance).

    Args:
        run_seed: The run's seed.
        round_num: The round.
        count: K, seeds per round.
    """
    out: list[int] = []
    for k in range(count):
        digest = hashlib.sha256(f"fedkrso/{int(run_seed)}/{int(round_num)}/{k}".encode()).digest()
        out.append(int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS))
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser on uint64 (numpy wraps unsigned overflow, which is what it needs).
    with np.errstate(over="ignore"):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def projection(seed: int, module: str, rank: int, in_features: int) -> torch.Tensor:
    """The random projection ``P`` (``rank x in_features``, float32) of ``module`` along ``seed``.

    Entries are ``+-1/sqrt(rank)`` with independent fair signs (Rademacher), so
    ``E[P^T P] = I`` as FedKRSO asks, and ``B @ P`` with ``B`` at zero is the base model.
    The canonical module path enters the seed, so every matrix gets its own projection.

    Args:
        seed: The subspace seed.
        module: Canonical module key (full-LLM layer numbers), e.g.
            ``base_model.model.model.layers.3.self_attn.q_proj``.
        rank: r, the subspace dimension per seed.
        in_features: The weight matrix's input dimension.

    Raises:
        TensorError: A rank or dimension below 1.
    """
    if rank < 1 or in_features < 1:
        raise TensorError(f"a subspace needs rank >= 1 and in_features >= 1, got {rank} and {in_features}")
    digest = hashlib.sha256(f"{int(seed)}/{module}".encode()).digest()
    start = np.uint64(int.from_bytes(digest[:8], "big"))
    with np.errstate(over="ignore"):
        counters = (np.arange(rank * in_features, dtype=np.uint64) + start) & _MASK64
    bits = (_splitmix64(counters) >> np.uint64(63)).astype(np.float32)
    signs = (bits * 2.0 - 1.0).reshape(rank, in_features)
    return torch.from_numpy(signs / math.sqrt(rank))


def rebuild(coordinates: Mapping[str, torch.Tensor], in_features: Callable[[str], int]) -> dict[str, torch.Tensor]:
    """The dense update of every module: ``sum_s B_s @ P_s`` over its coordinate keys.

    Args:
        coordinates: Coordinate key -> ``B`` (``d_out x r``).
        in_features: Module key -> its weight's input dimension.

    Returns:
        Module key -> float32 ``d_out x d_in`` update.
    """
    out: dict[str, torch.Tensor] = {}
    for key, b in coordinates.items():
        module, seed = split_key(key)
        p = projection(seed, module, int(b.shape[1]), in_features(module))
        update = b.detach().to(torch.float32) @ p
        out[module] = out[module] + update if module in out else update
    return out


def as_lora(
    coordinates: Mapping[str, torch.Tensor], in_features: Callable[[str], int], target_modules: Sequence[str]
) -> tuple[dict[str, torch.Tensor], LoraSettings]:
    """The accumulated update as one PEFT LoRA adapter (``lora_A`` = stacked projections,
    ``lora_B`` = stacked coordinates, alpha = rank so the scaling is 1).

    PEFT needs one rank for every module, so each module stacks the union of all seeds (in
    one fixed order); a seed a module was never trained along gets zero coordinates there.

    Args:
        coordinates: Coordinate key -> ``B`` (``d_out x r``), every ``r`` equal.
        in_features: Module key -> its weight's input dimension.
        target_modules: The module names the adapter wraps (for its config).

    Returns:
        ``(state, settings)``: LoRA tensors with PEFT keys and the settings to export them with.

    Raises:
        TensorError: No coordinates, or coordinates of different ranks.
    """
    by_module: dict[str, dict[int, torch.Tensor]] = {}
    for key, b in coordinates.items():
        module, seed = split_key(key)
        by_module.setdefault(module, {})[seed] = b
    if not by_module:
        raise TensorError("there are no subspace coordinates to turn into an adapter")
    ranks = {int(b.shape[1]) for seeds in by_module.values() for b in seeds.values()}
    if len(ranks) != 1:
        raise TensorError(f"subspace coordinates of different ranks {sorted(ranks)} cannot share one adapter")
    (rank,) = ranks
    all_seeds = sorted({s for seeds in by_module.values() for s in seeds})
    state: dict[str, torch.Tensor] = {}
    for module, seeds in sorted(by_module.items()):
        d_in = in_features(module)
        d_out = int(next(iter(seeds.values())).shape[0])
        a = torch.cat([projection(s, module, rank, d_in) for s in all_seeds])
        b = torch.cat(
            [seeds[s].detach().to(torch.float32) if s in seeds else torch.zeros(d_out, rank) for s in all_seeds], dim=1
        )
        state[f"{module}.lora_A.weight"] = a
        state[f"{module}.lora_B.weight"] = b
    total = rank * len(all_seeds)
    settings = LoraSettings(rank=total, alpha=float(total), dropout=0.0, target_modules=tuple(target_modules))
    return state, settings
