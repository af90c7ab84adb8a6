"""Integration: save a (global) adapter in PEFT format on the FULL LLM, and merge it on request.

Adapters trained on a sub-LLM are mapped to full-LLM layer indices (:mod:`shared.adapters`)
and written as a standard PEFT LoRA folder whose ``layers_to_transform`` lists exactly the
adapted layers, so ``PeftModel.from_pretrained(full_llm, folder)`` puts every tensor on the
right layer and leaves the other layers untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from coordinator.model.surgery import find_decoder_layers
from shared.adapters import (
    PEFT_PREFIX,
    LoraSettings,
    adapted_layers,
    layer_index,
    to_full_keys,
)
from shared.errors import ModelError, TensorError

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"


def _target_name(key: str) -> str | None:
    """The LoRA-wrapped module's own name in a PEFT key (``...q_proj.lora_A.weight`` -> ``q_proj``)."""
    for marker in (".lora_A.", ".lora_B."):
        if marker in key:
            return key.split(marker, 1)[0].rsplit(".", 1)[-1]
    return None


def export_adapter(
    state_dict: Mapping[str, torch.Tensor],
    full_model: nn.Module,
    out_dir: str | Path,
    lora: LoraSettings,
    *,
    layer_map: Sequence[int] | None = None,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write an adapter as a PEFT LoRA folder for the full LLM.

    Args:
        state_dict: LoRA tensors with PEFT keys (``base_model.model.<path>.lora_A.weight``),
            in full-LLM indices, or in sub-LLM indices when ``layer_map`` is given.
        full_model: The full LLM (or a model with the same module layout, e.g. on the meta
            device); used to find the layer list and check every key names a real module.
        out_dir: Folder to write ``adapter_config.json`` and ``adapter_model.safetensors`` into.
        lora: The LoRA settings the adapter was trained with.
        layer_map: Sub-LLM layer map; when given, keys are mapped from sub-LLM to full-LLM indices.
        base_model_name_or_path: Recorded in the adapter config (default: the full model's
            ``config._name_or_path``).

    Returns:
        ``out_dir`` as a Path.

    Raises:
        TensorError: A key names no module of the full model, a layer it does not have, or a
            module outside the LoRA target list; or an adapted layer lacks some target module.
    """
    from safetensors.torch import save_file

    prefix, layers = find_decoder_layers(full_model)
    tensors = dict(state_dict)
    if layer_map is not None:
        tensors = to_full_keys(tensors, layer_map, prefix)
    if not tensors:
        raise TensorError("the adapter is empty: nothing to export")
    module_names = {name for name, _ in full_model.named_modules()}
    targets = set(lora.target_modules)
    per_layer: dict[int, set[str]] = {}
    for key in tensors:
        if not key.startswith(PEFT_PREFIX) or _target_name(key) is None:
            raise TensorError(f"adapter key {key!r} is not a PEFT LoRA key (base_model.model.<module>.lora_A/B.weight)")
        module = key[len(PEFT_PREFIX) :].split(".lora_", 1)[0]
        if module not in module_names:
            raise TensorError(f"adapter key {key!r} names module {module!r}, which the full model does not have")
        target = _target_name(key)
        if target not in targets:
            raise TensorError(f"adapter key {key!r} wraps {target!r}, not one of the target modules {sorted(targets)}")
        index = layer_index(key, prefix)
        if index is None:
            raise TensorError(f"adapter key {key!r} is outside the decoder layers ({prefix}); not supported")
        if index >= len(layers):
            raise TensorError(f"adapter key {key!r} names layer {index}; the full model has {len(layers)}")
        per_layer.setdefault(index, set()).add(target)
    layers_adapted = adapted_layers(tensors, prefix)
    for index in layers_adapted:
        layer_prefix = f"{prefix}.{index}."
        present = {
            n.rsplit(".", 1)[-1] for n in module_names if n.startswith(layer_prefix) and n.rsplit(".", 1)[-1] in targets
        }
        missing = present - per_layer[index]
        if missing:
            # PEFT wraps every target module of a listed layer and would give these a fresh
            # random lora_A: refuse rather than export an adapter that is not the trained one.
            raise TensorError(f"layer {index} lacks LoRA tensors for {sorted(missing)}")

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = lora.peft_config(
        layers=layers_adapted,
        layers_prefix=prefix,
        target_modules=sorted(targets),
        base_model_name_or_path=base_model_name_or_path or getattr(full_model.config, "_name_or_path", None),
    )
    config.save_pretrained(str(out))
    save_file(
        {k: v.detach().to("cpu").contiguous() for k, v in sorted(tensors.items())},
        str(out / ADAPTER_WEIGHTS),
        metadata={"format": "pt"},
    )
    log.info("exported a LoRA adapter on %d full-LLM layers to %s", len(layers_adapted), out)
    return out


def load_exported_adapter(full_model: nn.Module, adapter_dir: str | Path, *, is_trainable: bool = False):
    """Load an exported adapter onto the full LLM with PEFT.

    Args:
        full_model: The full LLM (it becomes the PEFT model's base; PEFT wraps it in place).
        adapter_dir: Folder written by :func:`export_adapter`.
        is_trainable: Keep the adapter trainable.

    Returns:
        A ``peft.PeftModel``.

    Raises:
        ModelError: PEFT cannot load the folder onto this model.
    """
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(full_model, str(adapter_dir), is_trainable=is_trainable)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"cannot load adapter {adapter_dir} onto {type(full_model).__name__}: {exc}") from exc


def merge_adapter(full_model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """Merge an exported adapter into the full LLM's weights.

    Args:
        full_model: The full LLM in floating point (modified in place by PEFT).
        adapter_dir: Folder written by :func:`export_adapter`.

    Returns:
        The plain model with ``W += scaling * B @ A`` on every adapted module.
    """
    peft_model = load_exported_adapter(full_model, adapter_dir)
    return peft_model.merge_and_unload()
