"""Where the coordinator's full LLM lives and in which precision: ``--device`` and ``--dtype``.

``auto`` picks CUDA when PyTorch sees a GPU, else the CPU. The weight dtype follows the
device: bf16 on a GPU that supports it (fp16 on older ones), fp32 on the CPU, where bf16
matmuls are slow on most processors and fp32 keeps the results of this project's earlier
CPU runs. A model whose weights do not fit the one GPU's free memory is spread over every
visible GPU (and the CPU for the rest) by accelerate's ``device_map="auto"``.

SGP, ODA and evaluation run wherever the model's parameters are (they read
:func:`coordinator.model.evaluation.model_device`); packages are always written from CPU
copies, and adapters travel as CPU tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coordinator.settings import DEVICE_CHOICES, DTYPE_CHOICES
from shared.errors import ConfigError

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Share of a GPU's free memory the weights may take before the model is spread over devices:
#: SGP and ODA need the rest for the student, optimiser state and activations.
GPU_WEIGHT_SHARE = 0.6


@dataclass(frozen=True)
class Placement:
    """A resolved ``--device`` / ``--dtype`` pair.

    Attributes:
        device: ``"cuda"`` or ``"cpu"``.
        dtype: ``"bf16"``, ``"fp16"`` or ``"fp32"``.
    """

    device: str
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        """The weight dtype as a ``torch.dtype``."""
        return TORCH_DTYPES[self.dtype]

    def describe(self) -> str:
        """``"cuda, bf16"`` and the like, for progress lines."""
        return f"{self.device}, {self.dtype}"


def resolve_placement(device: str = "auto", dtype: str = "auto") -> Placement:
    """Turn ``--device`` / ``--dtype`` choices into a placement this machine can run.

    Args:
        device: ``auto``, ``cuda`` or ``cpu``.
        dtype: ``auto``, ``bf16``, ``fp16`` or ``fp32``.

    Returns:
        The placement.

    Raises:
        ConfigError: An unknown choice, ``cuda`` without a usable GPU, or bf16 on a GPU that
            does not support it.
    """
    if device not in DEVICE_CHOICES:
        raise ConfigError(f"device must be one of {', '.join(DEVICE_CHOICES)}; got {device!r}")
    if dtype not in DTYPE_CHOICES:
        raise ConfigError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}; got {dtype!r}")
    has_cuda = torch.cuda.is_available()
    if device == "cuda" and not has_cuda:
        raise ConfigError("--device cuda: PyTorch sees no CUDA GPU here (torch.cuda.is_available() is False); use --device cpu")
    chosen_device = "cuda" if device == "cuda" or (device == "auto" and has_cuda) else "cpu"
    if dtype == "auto":
        if chosen_device == "cpu":
            chosen_dtype = "fp32"
        else:
            chosen_dtype = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    else:
        chosen_dtype = dtype
    if chosen_device == "cuda" and chosen_dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bf16; use --dtype fp16 (or auto)")
    return Placement(chosen_device, chosen_dtype)


def needs_device_map(weight_bytes: int, placement: Placement) -> bool:
    """Whether the weights must be spread over several devices (accelerate's ``device_map="auto"``).

    Args:
        weight_bytes: The model's weights in the placement's dtype.
        placement: Where it goes.

    Returns:
        True on CUDA when the weights exceed :data:`GPU_WEIGHT_SHARE` of the current GPU's free memory.
    """
    if placement.device != "cuda":
        return False
    free, _total = torch.cuda.mem_get_info()
    return weight_bytes > GPU_WEIGHT_SHARE * free
