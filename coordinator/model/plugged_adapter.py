"""A frozen LoRA adapter merged into a model's weights for the length of a ``with`` block.

ODA's re-alignment plugs the global adapter into teacher and student (so the student's base
weights absorb what the adapter changed), and evaluation of the full model plugs in the final
adapter. Merging a frozen adapter is exact: it adds a fixed term to each weight, and the
gradient with respect to the base weight is the same as with the adapter on the side.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from shared.adapters import LoraSettings, lora_deltas
from shared.errors import ModelError


def _module_weight_delta(module: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """Orient a ``[out, in]`` LoRA delta like the module's weight (GPT-2's Conv1D stores ``[in, out]``)."""
    if type(module).__name__ == "Conv1D":
        delta = delta.T
    if module.weight.shape != delta.shape:
        raise ModelError(
            f"adapter delta of shape {tuple(delta.shape)} does not fit weight {tuple(module.weight.shape)}"
        )
    return delta


@contextlib.contextmanager
def plugged_adapter(
    model: nn.Module,
    adapter: Mapping[str, torch.Tensor],
    settings: LoraSettings,
    restore: Callable[[str], bool] | None = None,
) -> Iterator[list[str]]:
    """Temporarily add a frozen LoRA adapter's dense update ``W += scaling * B @ A`` to a model.

    A frozen adapter adds a fixed term to the weight, so merging it is exact, and the
    gradient of the loss with respect to the base weight is the same as with the adapter
    on the side. On exit every module is either restored from a saved copy (bit-exact) or,
    when ``restore(module_path)`` is False, has the delta subtracted from its (trained)
    weight.

    Args:
        model: The model whose module paths the adapter's keys name.
        adapter: LoRA tensors with PEFT keys for this model's layer indices.
        settings: LoRA settings (scaling).
        restore: Which modules to restore bit-exactly (default: all).

    Yields:
        The module paths that were changed.
    """
    deltas = lora_deltas(adapter, settings)
    saved: dict[str, torch.Tensor] = {}
    applied: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for path, delta in deltas.items():
                try:
                    module = model.get_submodule(path)
                except AttributeError as exc:
                    raise ModelError(f"the adapter names module {path!r}, which the model does not have") from exc
                oriented = _module_weight_delta(module, delta).to(module.weight.dtype).to(module.weight.device)
                if restore is None or restore(path):
                    saved[path] = module.weight.detach().clone()
                module.weight.add_(oriented)
                applied[path] = oriented
        yield list(applied)
    finally:
        with torch.no_grad():
            for path, oriented in applied.items():
                module = model.get_submodule(path)
                if path in saved:
                    module.weight.copy_(saved[path])
                else:
                    module.weight.sub_(oriented)
