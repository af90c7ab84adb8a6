"""Model preparation for local training: LoRA on, the start adapter loaded, LoRA off.

:func:`lora_for_training` wraps the client's bare (sub-)LLM in a fresh LoRA adapter for one
round and hands back the model as it found it afterwards (no LoRA layers, same train/eval
mode, ``requires_grad`` flags and KV-cache setting). :func:`attach_lora` and
:func:`detach_lora` are its two halves. The base-model half of that, freezing
(:func:`prepare_for_training`) and putting everything back (:func:`kept_as_found`), is
shared with FedKRSO's subspace training (:mod:`edge_client.subspace`). :func:`load_start` fills the adapter with the
round's starting values: the global adapter, or, before there is one, an initialisation
seeded per canonical key so that every tier starts from the same tensors.

4-bit models are checked first (:func:`check_4bit_cpu_layout`): bitsandbytes' CPU inference
layout has no autograd, so training on it would give wrong LoRA gradients.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch

from shared.adapters import LoraSettings, to_full_keys, to_sub_keys
from shared.errors import ModelError
from shared.subllm import is_4bit, linear4bit_modules

if TYPE_CHECKING:
    from shared.protocol import TrainingParams

_ADAPTER_NAME = "default"


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


def check_bare(model: torch.nn.Module) -> None:
    """Refuse a model that already carries a PEFT adapter (training must start from the bare (sub-)LLM).

    Raises:
        ModelError: It is PEFT-wrapped.
    """
    from peft import PeftModel

    if isinstance(model, PeftModel) or hasattr(model, "peft_config"):
        raise ModelError("the model already carries a PEFT adapter; pass the bare (sub-)LLM")


def prepare_for_training(model: torch.nn.Module, *, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """Freeze every base weight, and switch on gradient checkpointing if asked: what any method
    that trains extra parameters next to a frozen (sub-)LLM needs first.

    4-bit models go through ``peft.prepare_model_for_kbit_training`` (norms in fp32, base
    frozen) after :func:`check_4bit_cpu_layout`. Gradient checkpointing uses the non-reentrant
    variant, which needs no input-gradient hook. :func:`kept_as_found` undoes all but the fp32 norms.

    Args:
        model: A Hugging Face causal LM (plain or 4-bit).
        gradient_checkpointing: Recompute activations in backward to save memory.

    Returns:
        The same model, prepared.

    Raises:
        ModelError: Its 4-bit weights are in the CPU inference layout.
    """
    from peft import prepare_model_for_kbit_training

    if is_4bit(model):
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
    return model


def attach_lora(
    model: torch.nn.Module, params: TrainingParams, *, gradient_checkpointing: bool = False
) -> torch.nn.Module:
    """Freeze the base model and wrap it with a fresh LoRA adapter.

    The base is prepared by :func:`prepare_for_training` (4-bit preparation, frozen weights,
    optional non-reentrant gradient checkpointing). Undo with :func:`detach_lora`.

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
    from peft import get_peft_model

    check_bare(model)
    if params.lora_rank < 1:
        raise ModelError(f"LoRA rank must be >= 1, got {params.lora_rank}")
    model = prepare_for_training(model, gradient_checkpointing=gradient_checkpointing)
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


@contextmanager
def kept_as_found(model: torch.nn.Module) -> Iterator[None]:
    """Give ``model`` back after the ``with`` block as it was before it, for training.

    Inside the block the KV cache is off (useless in training, and it costs memory). On
    exit, whether the block finished, raised or was cut off, gradient checkpointing is
    switched off and the train/eval mode, ``requires_grad`` flags and ``config.use_cache``
    are put back; 4-bit models keep the fp32 norms ``prepare_model_for_kbit_training`` gave
    them. Removing what the block added to the model (LoRA layers, subspace wrappers) is the
    block's business, and must happen before this restores the flags.

    Args:
        model: The bare (sub-)LLM about to be prepared for training.
    """
    was_training = model.training
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    try:
        if use_cache is not None:
            model.config.use_cache = False
        yield
    finally:
        _disable_checkpointing(model)
        if use_cache is not None:
            model.config.use_cache = use_cache
        for p in model.parameters():
            p.requires_grad_(requires_grad.get(id(p), p.requires_grad))
        model.train(was_training)


@contextmanager
def lora_for_training(
    model: torch.nn.Module, params: TrainingParams, *, gradient_checkpointing: bool = False
) -> Iterator[torch.nn.Module]:
    """Attach LoRA for the ``with`` block, then leave ``model`` as it came (:func:`kept_as_found`).

    On exit, whether the block finished, raised or was cut off, the LoRA layers are removed
    and the model's train/eval mode, ``requires_grad`` flags and ``config.use_cache`` are
    put back; 4-bit models keep the fp32 norms ``prepare_model_for_kbit_training`` gave them.

    Args:
        model: The bare (sub-)LLM, as for :func:`attach_lora`.
        params: The round's TrainingParams (LoRA shape).
        gradient_checkpointing: Recompute activations in backward to save memory.

    Yields:
        The ``peft.PeftModel``, with the KV cache off (useless in training, and it costs memory).

    Raises:
        ModelError: As :func:`attach_lora`.
    """
    with kept_as_found(model):
        peft_model = attach_lora(model, params, gradient_checkpointing=gradient_checkpointing)
        try:
            yield peft_model
        finally:
            detach_lora(peft_model)


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


def load_start(
    adapter: Mapping[str, torch.nn.Parameter],
    global_adapter: Mapping[str, torch.Tensor] | None,
    layer_map: Sequence[int],
    layers_prefix: str,
    seed: int,
) -> None:
    """Fill the adapter with the round's starting values, in place.

    Args:
        adapter: From :func:`adapter_parameters` (sub-LLM keys).
        global_adapter: Canonical-key LoRA tensors; keys of full-LLM layers this sub-LLM
            lacks are ignored. ``None``: the init seeded per canonical key (A
            kaiming-uniform, B zero), the same on every tier.
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list (e.g. ``"model.layers"``).
        seed: The run's training seed (not the round's: the init must not change per round).

    Raises:
        ModelError: The global adapter lacks a tensor of this LoRA layout, has one too many,
            one of another shape, or one holding NaN/Inf.
    """
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
