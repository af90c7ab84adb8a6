"""Canonical adapter keys: LoRA tensors keyed by FULL-LLM layer index, and the maps to and from a sub-LLM.

Every delta and every global adapter on the wire is a dict keyed exactly as PEFT's
``get_peft_model_state_dict`` keys it on the full model (adapter name stripped), e.g.
``base_model.model.model.layers.17.self_attn.q_proj.lora_A.weight``. A client trains on a
sub-LLM whose layer ``i`` is full-LLM layer ``layer_map[i]``; :func:`to_full_keys` and
:func:`to_sub_keys` rewrite the layer number inside the key and nothing else.

``layers_prefix`` is the dotted path of the decoder layer list relative to the causal LM
(``"model.layers"``, ``"transformer.h"``, ``"gpt_neox.layers"``); the coordinator finds it and
records it in every package and manifest.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from shared.errors import ConfigError, TensorError

#: What PEFT puts in front of the base model's own module path.
PEFT_PREFIX = "base_model.model."

_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA hyper-parameters an adapter was trained with.

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is ``(alpha / r) * B @ A`` (``alpha / sqrt(r)`` with rsLoRA).
        dropout: LoRA dropout (training only).
        target_modules: Module names LoRA wraps, e.g. ``("q_proj", "v_proj")``.
        use_rslora: Rank-stabilised scaling.
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = field(default=("q_proj", "k_proj", "v_proj", "o_proj"))
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.target_modules:
            raise ConfigError("LoRA needs at least one target module")
        # Accept lists from TOML / messages but keep the dataclass hashable.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))

    @property
    def scaling(self) -> float:
        """Factor applied to ``B @ A``."""
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @classmethod
    def from_training(cls, params: Any) -> LoraSettings:
        """The LoRA settings of a round's training parameters.

        Args:
            params: A :class:`shared.protocol.TrainingParams` (or anything with its
                ``lora_rank``, ``lora_alpha``, ``lora_dropout`` and ``target_modules``).

        Returns:
            The settings.
        """
        return cls(
            rank=int(params.lora_rank),
            alpha=float(params.lora_alpha),
            dropout=float(params.lora_dropout),
            target_modules=tuple(params.target_modules),
        )

    def peft_config(
        self,
        *,
        layers: Sequence[int] | None = None,
        layers_prefix: str = "",
        target_modules: Sequence[str] | None = None,
        base_model_name_or_path: str | None = None,
    ) -> Any:
        """The ``peft.LoraConfig`` of these settings: the one way fedsoda builds one.

        Clients adapt every layer of their sub-LLM (``layers=None``); the coordinator names the
        full-LLM layers (``layers`` and ``layers_prefix``) when it builds the initial adapter or
        exports the final one.

        Args:
            layers: Decoder layer indices to adapt; None adapts every layer.
            layers_prefix: Dotted path of the decoder layer list (needed with ``layers``).
            target_modules: Overrides :attr:`target_modules` (an export names exactly the
                modules that carry tensors).
            base_model_name_or_path: Recorded in the saved adapter config.

        Returns:
            A ``peft.LoraConfig`` (bias none, causal LM task).
        """
        from peft import LoraConfig

        extra: dict[str, Any] = {}
        if layers is not None:
            extra = {"layers_to_transform": [int(i) for i in layers], "layers_pattern": layers_prefix.rsplit(".", 1)[-1]}
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=list(target_modules if target_modules is not None else self.target_modules),
            use_rslora=self.use_rslora,
            bias="none",
            task_type="CAUSAL_LM",
            base_model_name_or_path=base_model_name_or_path,
            **extra,
        )


def _layer_pattern(layers_prefix: str) -> re.Pattern[str]:
    # The prefix must start at a dot or the start of the key and be followed by ".<n>.", so
    # "model.layers" never matches inside e.g. "mymodel.layers" or "model.layers_norm".
    return re.compile(rf"(^|\.)({re.escape(layers_prefix)})\.(\d+)\.")


def layer_index(key: str, layers_prefix: str) -> int | None:
    """The decoder layer number inside an adapter key, or None if the key is not per-layer.

    Args:
        key: A state-dict key.
        layers_prefix: Dotted path of the decoder layer list, e.g. ``"model.layers"``.

    Returns:
        The layer number, or None.
    """
    match = _layer_pattern(layers_prefix).search(key)
    return int(match.group(3)) if match else None


def _replace_index(key: str, layers_prefix: str, new_index: int) -> str:
    pattern = _layer_pattern(layers_prefix)
    return pattern.sub(lambda m: f"{m.group(1)}{m.group(2)}.{new_index}.", key, count=1)


def to_full_keys(
    state_dict: Mapping[str, torch.Tensor], layer_map: Sequence[int], layers_prefix: str
) -> dict[str, torch.Tensor]:
    """Rename a sub-LLM adapter's keys to full-LLM layer indices.

    Args:
        state_dict: Adapter tensors keyed on the sub-LLM (layer ``i`` = sub-LLM layer).
        layer_map: ``layer_map[i]`` is the full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list.

    Returns:
        The same tensors keyed by full-LLM index. Keys that name no layer are kept as is.

    Raises:
        TensorError: A key names a sub-LLM layer the map does not have.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        index = layer_index(key, layers_prefix)
        if index is None:
            out[key] = value
            continue
        if index >= len(layer_map):
            raise TensorError(
                f"adapter key {key!r} names sub-LLM layer {index}, but the layer map has only "
                f"{len(layer_map)} layers"
            )
        out[_replace_index(key, layers_prefix, int(layer_map[index]))] = value
    return out


def to_sub_keys(
    state_dict: Mapping[str, torch.Tensor], layer_map: Sequence[int], layers_prefix: str
) -> dict[str, torch.Tensor]:
    """Rename a full-LLM adapter's keys to a sub-LLM's layer indices.

    Tensors of full-LLM layers the sub-LLM does not keep are left out (that tier does not
    hold them).

    Args:
        state_dict: Adapter tensors keyed by full-LLM index (canonical keys).
        layer_map: ``layer_map[i]`` is the full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list.

    Returns:
        The tensors of the kept layers keyed by sub-LLM index, plus keys that name no layer.
    """
    inverse = {int(full): sub for sub, full in enumerate(layer_map)}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        index = layer_index(key, layers_prefix)
        if index is None:
            out[key] = value
        elif index in inverse:
            out[_replace_index(key, layers_prefix, inverse[index])] = value
    return out


def adapted_layers(state_dict: Mapping[str, torch.Tensor], layers_prefix: str) -> list[int]:
    """Sorted layer numbers that carry adapter tensors.

    Args:
        state_dict: Adapter tensors.
        layers_prefix: Dotted path of the decoder layer list.

    Returns:
        Distinct layer numbers found in the keys, ascending.
    """
    found = {layer_index(k, layers_prefix) for k in state_dict}
    return sorted(i for i in found if i is not None)


def lora_deltas(state_dict: Mapping[str, torch.Tensor], settings: LoraSettings) -> dict[str, torch.Tensor]:
    """Dense weight updates ``scaling * B @ A`` of every LoRA-wrapped module.

    Args:
        state_dict: Adapter tensors with PEFT keys (``...<module>.lora_A.weight`` of shape
            ``[r, in]`` and ``...<module>.lora_B.weight`` of shape ``[out, r]``).
        settings: The LoRA settings (for the scaling).

    Returns:
        ``{module_path: Tensor[out, in]}`` in float32, where ``module_path`` is the module's
        path in the base model (PEFT's ``base_model.model.`` prefix removed).

    Raises:
        TensorError: A lora_A has no matching lora_B (or the reverse), or shapes disagree.
    """
    a_keys = {k[: -len(_LORA_A)]: k for k in state_dict if k.endswith(_LORA_A)}
    b_keys = {k[: -len(_LORA_B)]: k for k in state_dict if k.endswith(_LORA_B)}
    if set(a_keys) != set(b_keys):
        unpaired = sorted(set(a_keys) ^ set(b_keys))
        raise TensorError(f"LoRA tensors without their A/B partner: {unpaired[:5]}")
    deltas = {}
    for module, a_key in a_keys.items():
        a = state_dict[a_key].float()
        b = state_dict[b_keys[module]].float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise TensorError(
                f"LoRA shapes of {module!r} do not chain: A {tuple(a.shape)}, B {tuple(b.shape)}"
            )
        path = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        deltas[path] = settings.scaling * (b @ a)
    return deltas
