"""Sub-LLM surgery: find the decoder layers of any causal LM, drop layers, and keep every index right.

The full LLM's decoder layers are located generically (the ``nn.ModuleList`` of
``config.num_hidden_layers`` identical blocks), so Llama, Qwen2, Mistral, Gemma, Phi, GPT-2
and GPT-NeoX style models all work without a per-family table. Dropping layers fixes what a
layer keeps about its own position (``layer_idx`` and friends, which index the KV cache) and
what the config keeps per layer (``num_hidden_layers``, ``layer_types`` and other per-layer
lists), so the sub-LLM generates with a KV cache and reloads from its own ``config.json``.

A sub-LLM's *layer map* ``kept`` says ``sub-LLM layer i == full-LLM layer kept[i]``; it is
how adapters find their way back to the full model (:mod:`shared.adapters`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence

from torch import nn

from shared.errors import ModelError
from shared.layermap import LAYER_MAP_ATTRIBUTE, subset_layer_config, validate_layer_map

log = logging.getLogger(__name__)

#: Attributes a layer's sub-modules use to remember their own position (KV-cache slot,
#: sliding-window choice). They are rewritten to the sub-LLM index after surgery.
LAYER_INDEX_ATTRIBUTES = ("layer_idx", "layer_id", "layer_index", "layer_number")



def text_config(model_or_config):
    """Return the decoder (text) config of a model or config.

    Args:
        model_or_config: A ``PreTrainedModel`` or ``PreTrainedConfig``.

    Returns:
        The config that holds ``num_hidden_layers`` (the same object for plain LMs).
    """
    config = getattr(model_or_config, "config", model_or_config)
    getter = getattr(config, "get_text_config", None)
    return getter(decoder=True) if callable(getter) else config


def num_layers_in_config(model_or_config) -> int | None:
    """Return ``num_hidden_layers`` from a model's text config, or None when it has none."""
    value = getattr(text_config(model_or_config), "num_hidden_layers", None)
    return int(value) if isinstance(value, int) else None


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Find the ``nn.ModuleList`` that holds a causal LM's decoder layers.

    The list is found by shape, not by name: an ``nn.ModuleList`` of blocks that all have
    the same class, whose length equals the config's ``num_hidden_layers`` (when the config
    has one). Among several such lists the one holding the most parameters wins (the decoder
    blocks, not e.g. a list of per-layer norms).

    Args:
        model: A Hugging Face causal LM (optionally wrapped, e.g. by PEFT).

    Returns:
        ``(prefix, layers)``: the dotted path of the list relative to ``model`` (e.g.
        ``"model.layers"``, ``"transformer.h"``, ``"gpt_neox.layers"``) and the list itself.

    Raises:
        ModelError: No list of identical blocks of the expected length exists.
    """
    expected = num_layers_in_config(model)
    seen: list[str] = []
    candidates: list[tuple[int, str, nn.ModuleList]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        seen.append(f"{name or '<root>'}[{len(module)} x {type(module[0]).__name__}]")
        if len({type(m) for m in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        n_params = sum(p.numel() for p in module.parameters())
        candidates.append((n_params, name, module))
    if not candidates:
        wanted = (
            f"an nn.ModuleList of {expected} identical blocks (config.num_hidden_layers={expected})"
            if expected is not None
            else "an nn.ModuleList of identical blocks (and the config has no num_hidden_layers)"
        )
        found = ", ".join(seen) if seen else "no nn.ModuleList at all"
        raise ModelError(
            f"cannot find the decoder layers of {type(model).__name__}: expected {wanted}; found {found}. "
            "fedsoda supports Hugging Face decoder-only causal LMs whose layers sit in one ModuleList."
        )
    candidates.sort(key=lambda c: c[0], reverse=True)
    _, prefix, layers = candidates[0]
    return prefix, layers


def _set_submodule(root: nn.Module, dotted: str, value: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, value)


def build_submodel(full_model: nn.Module, kept: Sequence[int]) -> nn.Module:
    """Build a sub-LLM that keeps only the given decoder layers of a full LLM.

    The full model is deep-copied, all but the dropped layers, and stays intact. In the copy, the decoder layer
    list holds only ``kept`` (in order), every per-layer index attribute
    (:data:`LAYER_INDEX_ATTRIBUTES`, e.g. attention ``layer_idx`` that picks the KV-cache slot)
    is renumbered to the sub-LLM position, and the config's ``num_hidden_layers`` and any
    per-layer list (``layer_types`` ...) are cut to match, so the sub-LLM saves and reloads
    from its own config.

    Args:
        full_model: A Hugging Face causal LM.
        kept: Full-LLM indices of the layers to keep, strictly increasing (the layer map).

    Returns:
        The sub-LLM (same class, same dtype and device as ``full_model``). Its
        ``config.num_hidden_layers == len(kept)`` and its config records the layer map
        (:func:`layer_map_of`), composed with the input's own map when the input was
        itself a sub-LLM.

    Raises:
        ModelError: The decoder layers cannot be found, the layer map is invalid, or the
            model cannot be pruned (heterogeneous per-layer configs, layer-index-scaled
            attention).
    """
    prefix, layers = find_decoder_layers(full_model)
    old_layers = len(layers)
    kept = validate_layer_map(kept, old_layers)
    # Validate the config before copying weights (cheap failure first).
    subset_layer_config(copy.deepcopy(text_config(full_model)), kept, old_layers)

    # Copy everything except the layers being dropped: deepcopy takes what the memo already
    # holds as copied, so they become one empty placeholder and the peak stays at the full
    # model plus the sub-LLM, not twice the full model.
    placeholder = nn.Module()
    kept_set = set(kept)
    memo = {id(layer): placeholder for i, layer in enumerate(layers) if i not in kept_set}
    sub = copy.deepcopy(full_model, memo)
    sub_layers = sub.get_submodule(prefix)  # still holds the placeholders: not a list of identical blocks
    new_layers = nn.ModuleList([sub_layers[k] for k in kept])
    _set_submodule(sub, prefix, new_layers)
    for new_index, layer in enumerate(new_layers):
        for module in layer.modules():
            for attr in LAYER_INDEX_ATTRIBUTES:
                value = getattr(module, attr, None)
                if isinstance(value, int) and not isinstance(value, bool):
                    setattr(module, attr, new_index)
    # deepcopy copied the config once and every sub-module that holds it points at that
    # copy, so editing it in place updates them all.
    config = text_config(sub)
    # Pruning a sub-LLM again composes the maps, so indices always refer to the original model.
    original = layer_map_of(full_model)
    changed = subset_layer_config(config, kept, old_layers)
    setattr(config, LAYER_MAP_ATTRIBUTE, [original[k] for k in kept])
    log.debug("built a %d-layer sub-LLM from %d layers (config keys cut: %s)", len(kept), old_layers, changed)
    return sub


def layer_map_of(model: nn.Module) -> list[int]:
    """The layer map a model's config records (identity for a model that was never pruned).

    Args:
        model: A causal LM, possibly built by :func:`build_submodel`.

    Returns:
        ``map[i]`` = index in the original model of layer ``i``.
    """
    recorded = getattr(text_config(model), LAYER_MAP_ATTRIBUTE, None)
    if recorded is not None:
        return [int(i) for i in recorded]
    return list(range(len(find_decoder_layers(model)[1])))


def _layer_output_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


@contextlib.contextmanager
def capture_layer_io(model: nn.Module, layers: Sequence[int] | None = None, *, inputs: bool = False) -> Iterator[dict]:
    """Record decoder layer outputs (and optionally the first layer's input) during forwards.

    Forward hooks on the decoder layers keep the hidden state each listed layer returns,
    raw (before any final norm), which works the same for every architecture, unlike
    ``output_hidden_states`` whose last entry is post-norm in most models.

    Args:
        model: A causal LM.
        layers: Decoder layer indices to record; all when None.
        inputs: Also record the hidden state entering layer 0 under key ``"input"``.

    Yields:
        A dict filled on every forward: ``{layer_index: Tensor[B, T, H], "input": ...}``.
        It is overwritten by the next forward.
    """
    _, module_list = find_decoder_layers(model)
    wanted = range(len(module_list)) if layers is None else layers
    store: dict = {}
    handles = []

    def make_hook(index: int):
        def hook(_module, _args, output):
            store[index] = _layer_output_tensor(output)

        return hook

    def pre_hook(_module, args, kwargs):
        store["input"] = args[0] if args else kwargs["hidden_states"]

    try:
        for index in wanted:
            handles.append(module_list[index].register_forward_hook(make_hook(index)))
        if inputs:
            handles.append(module_list[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
        yield store
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def skip_layers(model: nn.Module, skipped: Sequence[int]) -> Iterator[None]:
    """Make the given decoder layers of a model act as identity (for reference computations).

    Args:
        model: A causal LM.
        skipped: Decoder layer indices whose output is replaced by their input.

    Yields:
        Nothing; the hooks are removed on exit.
    """
    _, module_list = find_decoder_layers(model)
    handles = []

    def hook(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    try:
        for index in skipped:
            handles.append(module_list[index].register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def parameter_count(model: nn.Module) -> int:
    """Number of parameters of a model (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
