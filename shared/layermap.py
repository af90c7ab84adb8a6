"""Layer maps: which full-LLM layers a sub-LLM tier keeps, and what its config must say.

A sub-LLM's *layer map* ``kept`` says ``sub-LLM layer i == full-LLM layer kept[i]``. A *tier*
is named after its depth, the number of layers it keeps (:func:`tier_name`: ``L18`` keeps 18
layers), whatever method chose them. The coordinator (which builds tiers), the planner (which
picks one for a device) and the client (which loads one) all use these helpers, so the three
never disagree about names, nesting or per-layer config fields.

Nothing here imports torch or transformers: configs are handled through their ``to_dict``
and attributes, so any ``PreTrainedConfig`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shared.errors import ConfigError, ModelError

#: Config attribute where a sub-LLM records its layer map (saved in its config.json too).
LAYER_MAP_ATTRIBUTE = "fedsoda_layer_map"

#: Config keys that are per-layer lists even when they do not say "layer" in their name.
_PER_LAYER_KEYS_EXTRA = frozenset({"sliding_window_pattern_list", "attention_type_list"})

#: Config keys that are never per-layer lists, whatever their length.
_NEVER_PER_LAYER = frozenset({"architectures", "eos_token_id", "bos_token_id", "pad_token_id"})

#: Layers the uniform-drop baseline (Offsite-Tuning / FedOT) keeps at each end.
UNIFORM_KEEP_ENDS = 2


def tier_name(depth: int) -> str:
    """Name of the tier that keeps ``depth`` layers: ``L<depth>`` (e.g. ``"L18"``)."""
    return f"L{int(depth)}"


def validate_layer_map(kept: Sequence[int], num_layers: int) -> list[int]:
    """Check a layer map and return it as a list.

    Args:
        kept: Full-LLM indices of the layers to keep, strictly increasing.
        num_layers: Number of layers of the full LLM.

    Returns:
        ``list(kept)``.

    Raises:
        ModelError: Empty, out of range, unsorted or repeated indices.
    """
    kept = [int(k) for k in kept]
    if not kept:
        raise ModelError("a sub-LLM must keep at least one layer; the layer map is empty")
    if any(k < 0 or k >= num_layers for k in kept):
        raise ModelError(f"layer map {kept} has indices outside 0..{num_layers - 1}")
    if any(b <= a for a, b in zip(kept, kept[1:])):
        raise ModelError(f"layer map {kept} must be strictly increasing (no repeats)")
    return kept


def check_ranking(num_layers: int, ranking: Sequence[Sequence[int]]) -> None:
    """Check that SGP blocks are non-empty, in range, disjoint, and leave a layer.

    Args:
        num_layers: Layers of the full LLM.
        ranking: Blocks in pruning order, each a list of full-LLM layer indices.

    Raises:
        ConfigError: A block is empty, names a layer outside the model or one another block
            holds, or the blocks together prune every layer.
    """
    seen: set[int] = set()
    for n, block in enumerate(ranking):
        if not block:
            raise ConfigError(f"ranking block {n} is empty")
        for i in block:
            if not 0 <= int(i) < num_layers:
                raise ConfigError(f"ranking block {n} names layer {i}, outside 0..{num_layers - 1}")
            if int(i) in seen:
                raise ConfigError(f"layer {i} appears in two ranking blocks; blocks must not overlap")
            seen.add(int(i))
    if len(seen) >= num_layers:
        raise ConfigError("the ranking prunes every layer; keep at least one")


def kept_layers(num_layers: int, ranking: Sequence[Sequence[int]], num_blocks: int) -> list[int]:
    """The layer map of the tier that prunes the first ``num_blocks`` ranked blocks.

    Pruning one more block of the same ranking keeps a subset of these layers, so tiers
    cut from one ranking nest.

    Args:
        num_layers: Layers of the full LLM.
        ranking: SGP blocks in pruning order (``coordinator.model.sgp.rank_blocks``).
        num_blocks: Blocks to prune ``p`` (0 keeps every layer).

    Returns:
        Full-LLM indices of the kept layers, ascending.

    Raises:
        ConfigError: More blocks asked for than the ranking holds.
    """
    if not 0 <= num_blocks <= len(ranking):
        raise ConfigError(
            f"cannot prune {num_blocks} blocks: only {len(ranking)} non-overlapping blocks fit "
            "(use a smaller block size, fewer blocks or fewer protected layers)"
        )
    pruned = {int(i) for block in ranking[:num_blocks] for i in block}
    return [i for i in range(num_layers) if i not in pruned]


def blocks_for_depth(num_layers: int, depth: int, block_size: int) -> int:
    """Number of blocks ``p`` that prune a ``num_layers``-layer model to ``depth`` layers.

    Args:
        num_layers: Layers of the full LLM.
        depth: Layers the sub-LLM keeps.
        block_size: Layers per block.

    Returns:
        ``(num_layers - depth) / block_size``.

    Raises:
        ConfigError: ``num_layers - depth`` is not a non-negative multiple of ``block_size``,
            or ``depth`` keeps no layer.
    """
    removed = num_layers - depth
    if depth < 1 or removed < 0 or removed % block_size:
        raise ConfigError(
            f"depth {depth} cannot be reached from {num_layers} layers with blocks of {block_size}: "
            f"{num_layers} - {depth} = {removed} must be a non-negative multiple of {block_size}, and depth >= 1"
        )
    return removed // block_size


def default_depth(num_layers: int, block_size: int, fraction: float = 0.6) -> int:
    """The reachable depth closest to ``fraction`` of the full depth (at least one block pruned).

    Args:
        num_layers: Layers of the full LLM.
        block_size: Layers per SGP block.
        fraction: Share of layers to keep.

    Returns:
        ``num_layers - p * block_size`` for the ``p >= 1`` that comes closest.
    """
    blocks = max(1, round((1 - fraction) * num_layers / block_size))
    return num_layers - blocks * block_size


def uniform_drop_layers(num_layers: int, depth: int, keep_ends: int = UNIFORM_KEEP_ENDS) -> list[int]:
    """Layer map of the uniform-drop baseline (Offsite-Tuning / FedOT).

    Keeps the first and last ``keep_ends`` layers (fewer when ``depth`` is too shallow to keep
    them all: at most ``depth // 2`` at each end) and spreads the remaining kept layers evenly
    over the middle.

    Args:
        num_layers: Layers of the full LLM.
        depth: Layers the sub-LLM keeps.
        keep_ends: Layers kept at each end (at most).

    Returns:
        The layer map (strictly increasing full-LLM indices, ``depth`` of them).

    Raises:
        ModelError: ``depth`` is out of range.
    """
    if not 1 <= depth <= num_layers:
        raise ModelError(f"uniform drop to depth {depth} needs 1 <= depth <= {num_layers}")
    ends = min(keep_ends, depth // 2)
    middle = list(range(ends, num_layers - ends))
    n_mid = depth - 2 * ends
    if n_mid == 0:
        chosen: list[int] = []
    elif n_mid == 1:
        chosen = [middle[len(middle) // 2]]
    else:
        # Evenly spaced positions over the middle, ends included; the spacing is at least 1
        # so the positions are distinct.
        step = (len(middle) - 1) / (n_mid - 1)
        chosen = [middle[round(i * step)] for i in range(n_mid)]
    return list(range(ends)) + chosen + list(range(num_layers - ends, num_layers))


def bridge_layers(kept: Sequence[int]) -> list[int]:
    """Sub-LLM indices of the bridge layers: the kept layer right after each pruned gap.

    Args:
        kept: The layer map.

    Returns:
        Sub-LLM indices ``i`` where layers were removed just before ``kept[i]``.
    """
    bridges = []
    previous = -1
    for i, k in enumerate(kept):
        if k - previous > 1:
            bridges.append(i)
        previous = k
    return bridges


def check_prunable_config(config: Any) -> None:
    """Refuse configs whose layers cannot be dropped without changing what the rest compute.

    Args:
        config: The decoder (text) config of a causal LM.

    Raises:
        ModelError: Per-layer config overrides (heterogeneous models), or attention scaled by
            the layer index (GPT-2's ``scale_attn_by_inverse_layer_idx``).
    """
    if getattr(config, "is_heterogeneous", False):
        raise ModelError(
            f"{type(config).__name__} uses per-layer config overrides (per_layer_config); "
            "pruning such heterogeneous models is not supported"
        )
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        # GPT-2 scales attention by 1/(layer_idx+1): renumbering layers would change what
        # every kept layer computes, so the pruned model would not be the same function.
        raise ModelError(
            "this model scales attention by its layer index (scale_attn_by_inverse_layer_idx=True); "
            "dropping layers would change every later layer's output, so it cannot be pruned"
        )


def subset_layer_config(config: Any, kept: Sequence[int], old_layers: int) -> list[str]:
    """Cut a config's per-layer fields down to ``kept``, in place.

    ``num_hidden_layers`` becomes ``len(kept)`` and every per-layer list (``layer_types``,
    ``sliding_window_pattern_list`` ...: a list of ``old_layers`` entries whose key names
    layers) keeps the entries of ``kept``, so a sub-LLM (or a cut copy) reloads from its own
    config. The recorded layer map (:data:`LAYER_MAP_ATTRIBUTE`) is left to the caller.

    Args:
        config: The decoder (text) config to edit.
        kept: Indices of the layers kept, in the config's current numbering.
        old_layers: Layers the config describes now.

    Returns:
        The keys it changed.

    Raises:
        ModelError: The config cannot be pruned (:func:`check_prunable_config`).
    """
    check_prunable_config(config)
    changed = ["num_hidden_layers"]
    for key, value in list(config.to_dict().items()):
        if key == LAYER_MAP_ATTRIBUTE:
            continue
        if key in _NEVER_PER_LAYER or not isinstance(value, (list, tuple)) or len(value) != old_layers:
            continue
        if "layer" not in key and key not in _PER_LAYER_KEYS_EXTRA:
            continue
        setattr(config, key, type(value)(value[k] for k in kept))
        changed.append(key)
    config.num_hidden_layers = len(kept)
    return changed
