"""Tensors as (dtype, shape, bytes): exact round trips, no numpy, no pickle."""

from __future__ import annotations

import pytest
import torch

from shared import codec
from shared.errors import TensorError
from shared.protocol import GlobalAdapter, MessageType, TensorPayload
from shared.tensors import (
    from_payload,
    payloads_to_state,
    state_to_payloads,
    to_payload,
)


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool],
)
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        t = (torch.randn(5, 7, generator=gen) * 1000).to(dtype)
    elif dtype == torch.bool:
        t = torch.rand(5, 7, generator=gen) > 0.5
    else:
        t = torch.randint(-100 if dtype != torch.uint8 else 0, 100, (5, 7), generator=gen).to(dtype)
    back = from_payload(to_payload(t))
    assert back.dtype == dtype and back.shape == t.shape
    assert torch.equal(
        back.view(torch.uint8) if dtype != torch.bool else back, t.view(torch.uint8) if dtype != torch.bool else t
    )


def test_bfloat16_bits_survive_encode_decode() -> None:
    # Values whose bf16 bits differ from any float32 rounding shortcut, plus inf and nan payloads.
    bits = torch.tensor([0x3F80, 0x3F81, 0xFF80, 0x7FC1, 0x0001, 0x8000], dtype=torch.int32).to(torch.int16)
    t = bits.view(torch.bfloat16)
    env = codec.decode(
        codec.encode(MessageType.GLOBAL_ADAPTER, GlobalAdapter(0, {"w": to_payload(t)}), run="r", round=0, sender="c")
    )
    back = from_payload(env.body.tensors["w"])
    assert torch.equal(back.view(torch.int16), bits)


def test_non_contiguous_scalar_empty_and_grad_tensors() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    view = base.t()[1:]  # non-contiguous with a storage offset
    assert torch.equal(from_payload(to_payload(view)), view)
    scalar = torch.tensor(3.5)
    assert from_payload(to_payload(scalar)).shape == torch.Size([])
    assert from_payload(to_payload(scalar)).item() == 3.5
    empty = torch.empty(0, 5, dtype=torch.float16)
    assert from_payload(to_payload(empty)).shape == (0, 5)
    leaf = torch.ones(2, requires_grad=True)
    assert not from_payload(to_payload(leaf * 2)).requires_grad


def test_rebuilt_tensor_is_writable_and_independent() -> None:
    payload = to_payload(torch.zeros(3))
    t = from_payload(payload)
    t += 1
    assert torch.equal(from_payload(payload), torch.zeros(3))


def test_state_dict_helpers_keep_keys() -> None:
    state = {"a": torch.ones(2, 2, dtype=torch.bfloat16), "b": torch.arange(3)}
    back = payloads_to_state(state_to_payloads(state))
    assert list(back) == ["a", "b"] and all(torch.equal(back[k], state[k]) for k in state)


def test_disallowed_dtypes_and_inconsistent_payloads_raise() -> None:
    with pytest.raises(TensorError, match="float64"):
        to_payload(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(TensorError, match="not allowed"):
        TensorPayload(dtype="object", shape=[1], data=b"\0" * 8)
    with pytest.raises(TensorError, match="needs 8 bytes, got 7"):
        TensorPayload(dtype="float32", shape=[2], data=b"\0" * 7)
    with pytest.raises(TensorError, match="negative"):
        TensorPayload(dtype="float32", shape=[-1, -2], data=b"\0" * 8)
