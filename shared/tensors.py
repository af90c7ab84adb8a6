"""Tensors on the wire as (dtype, shape, raw bytes): no numpy, no pickle, ever.

Bytes are the tensor's memory in C order on a little-endian host (every platform fedsoda
targets), read straight from the CPU tensor's storage and rebuilt with
``torch.frombuffer``, so bfloat16 round-trips bit for bit.
"""

from __future__ import annotations

import ctypes
import hashlib
import sys
from collections.abc import Mapping

import torch

from shared.errors import TensorError
from shared.protocol import TENSOR_DTYPES, TensorPayload

_TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "int32": torch.int32,
    "int64": torch.int64,
    "bool": torch.bool,
}
_NAMES: dict[torch.dtype, str] = {v: k for k, v in _TORCH_DTYPES.items()}
assert set(_TORCH_DTYPES) == set(TENSOR_DTYPES), "wire dtype allow-list and torch mapping disagree"

if sys.byteorder != "little":  # pragma: no cover - no supported platform is big-endian
    raise ImportError("shared.tensors assumes a little-endian host")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name.

    Args:
        name: One of :data:`shared.protocol.TENSOR_DTYPES`.

    Returns:
        The torch dtype.

    Raises:
        TensorError: ``name`` is not on the allow-list.
    """
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise TensorError(f"tensor dtype {name!r} is not allowed; allowed: {', '.join(_TORCH_DTYPES)}") from None


def to_payload(tensor: torch.Tensor) -> TensorPayload:
    """Copy a tensor's values into a :class:`TensorPayload`.

    Args:
        tensor: Any-shaped tensor of an allowed dtype, on any device; autograd history is
            ignored.

    Returns:
        The payload; ``data`` holds ``numel * itemsize`` bytes in C order.

    Raises:
        TensorError: The dtype is not on the wire allow-list (e.g. float64, complex).
    """
    name = _NAMES.get(tensor.dtype)
    if name is None:
        raise TensorError(f"cannot send a {tensor.dtype} tensor; convert it to one of {', '.join(_TORCH_DTYPES)} first")
    flat = tensor.detach().to("cpu").contiguous()
    nbytes = flat.numel() * flat.element_size()
    # One copy straight out of the tensor's memory (contiguous, so data_ptr() starts it).
    data = ctypes.string_at(flat.data_ptr(), nbytes) if nbytes else b""
    return TensorPayload(dtype=name, shape=list(flat.shape), data=data)


def from_payload(payload: TensorPayload) -> torch.Tensor:
    """Rebuild a CPU tensor from a payload (the payload is validated on construction).

    Args:
        payload: A validated :class:`TensorPayload`.

    Returns:
        A new, writable CPU tensor of ``payload.shape`` and dtype; it owns its memory.

    Raises:
        TensorError: The dtype is not on the allow-list.
    """
    dtype = torch_dtype(payload.dtype)
    if not payload.data:
        return torch.empty(payload.shape, dtype=dtype)
    # bytearray: a writable copy that the tensor keeps alive (frombuffer shares its memory).
    return torch.frombuffer(bytearray(payload.data), dtype=dtype).reshape(payload.shape)


def state_to_payloads(state: dict[str, torch.Tensor]) -> dict[str, TensorPayload]:
    """Convert a state dict (e.g. an adapter delta) into payloads.

    Args:
        state: Name -> tensor.

    Returns:
        Name -> payload, same keys and order.
    """
    return {name: to_payload(t) for name, t in state.items()}


def payloads_digest(payloads: Mapping[str, TensorPayload]) -> str:
    """sha256 of a set of tensors as they travel: names (sorted), dtypes, shapes and bytes.

    Both sides compute it from the payloads, so it names one exact adapter whatever the
    order of its keys.

    Args:
        payloads: Name -> payload (e.g. a global adapter's tensors).

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for name in sorted(payloads):
        p = payloads[name]
        header = f"{len(name)}:{name}|{p.dtype}|{','.join(map(str, p.shape))}|{len(p.data)}|"
        h.update(header.encode())
        h.update(p.data)
    return h.hexdigest()


def payloads_to_state(payloads: dict[str, TensorPayload]) -> dict[str, torch.Tensor]:
    """Convert payloads back into a state dict of CPU tensors.

    Args:
        payloads: Name -> payload.

    Returns:
        Name -> tensor, same keys and order.
    """
    return {name: from_payload(p) for name, p in payloads.items()}
