"""Training setups: LoRA parameter counts against PEFT's, and invalid setups refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hardware_profiles.shape import model_shape
from hardware_profiles.training_setup import TrainingSetup, lora_param_count
from shared.errors import ConfigError


def test_lora_parameter_count_matches_peft(tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    real = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    setup = TrainingSetup(lora_rank=16, lora_targets=("q_proj", "v_proj", "down_proj"))
    assert lora_param_count(model_shape(tiny_model_dir), setup) == real


@pytest.mark.parametrize(
    "bad",
    [dict(precision="fp8"), dict(batch_size=0), dict(lora_dropout=1.0), dict(lora_targets=()), dict(optimizer="lion"),
     dict(device="cpu", unified_memory=True)],
)
def test_invalid_setups_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        TrainingSetup(**bad)
