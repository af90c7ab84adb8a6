"""FLOP counts of a training step: they scale with tokens, and checkpointing adds a forward."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hardware_profiles.flops import training_flops
from hardware_profiles.training_setup import TrainingSetup

from .conftest import LLAMA_7B


def test_training_flops_scale_with_tokens_and_checkpointing() -> None:
    setup = TrainingSetup(num_layers=32, precision="bf16", batch_size=4, seq_len=512)
    flops = training_flops(LLAMA_7B, setup)
    # ~4 * params * tokens for forward + activation backward of a frozen 6.7 B model
    assert 4 * 6.5e9 * 2048 < flops < 4 * 7.2e9 * 2048 * 1.2
    assert training_flops(LLAMA_7B, replace(setup, grad_checkpointing=True)) == pytest.approx(flops * 1.5, rel=0.01)
