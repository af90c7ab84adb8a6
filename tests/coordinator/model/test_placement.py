"""--device / --dtype: what auto picks here, and clear refusals."""

from __future__ import annotations

import pytest
import torch

from coordinator.model.models import load_model
from coordinator.model.placement import Placement, needs_device_map, resolve_placement
from coordinator.settings import ModelSettings
from shared.errors import ConfigError


def test_auto_on_a_machine_without_cuda_is_cpu_fp32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_placement() == Placement("cpu", "fp32")
    assert resolve_placement("cpu", "bf16") == Placement("cpu", "bf16")
    assert not needs_device_map(10**15, Placement("cpu", "fp32"))


def test_auto_with_cuda_picks_bf16_or_fp16(monkeypatch):
    # No GPU here: torch's own answers are replaced to check the choice, nothing runs on CUDA.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_placement() == Placement("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_placement("auto", "auto") == Placement("cuda", "fp16")
    with pytest.raises(ConfigError, match="does not support bf16"):
        resolve_placement("cuda", "bf16")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (10 * 2**30, 16 * 2**30))
    assert needs_device_map(7 * 2**30, Placement("cuda", "fp16"))
    assert not needs_device_map(5 * 2**30, Placement("cuda", "fp16"))


def test_refusals_are_specific(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sees no CUDA GPU"):
        resolve_placement("cuda")
    with pytest.raises(ConfigError, match="device must be one of"):
        resolve_placement("tpu")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        resolve_placement("cpu", "int8")
    with pytest.raises(ConfigError, match="model.dtype"):
        ModelSettings(dtype="fp8")
    with pytest.raises(ConfigError, match="model.device"):
        ModelSettings(device="gpu")


def test_load_model_in_bf16_on_cpu(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, Placement("cpu", "bf16"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    model32, _ = load_model(tiny_model_dir)
    assert {p.dtype for p in model32.parameters()} == {torch.float32}
