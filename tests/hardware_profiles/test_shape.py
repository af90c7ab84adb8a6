"""Model shapes from Hugging Face configs: every config form, unreadable configs, big models on meta.

The cut SmolLM2 is loaded for real to compare against.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hardware_profiles.shape import model_shape
from shared.errors import ModelError

from .conftest import LLAMA_7B


def test_shape_from_a_model_folder_matches_the_real_model(tiny_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    shape = model_shape(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert shape.num_layers == 4 and shape.hidden_size == 576 and shape.num_kv_heads == 3
    assert shape.total_params() == sum(p.numel() for p in model.parameters())
    assert shape.lm_head_params == 0  # SmolLM2 ties its embeddings
    assert {lin.name for lin in shape.layer_linears} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    }
    assert shape.gated_mlp


def test_config_forms_agree(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    as_dict = json.loads((tiny_model_dir / "config.json").read_text())
    assert model_shape(config) == model_shape(tiny_model_dir) == model_shape(tiny_model_dir / "config.json") == model_shape(as_dict)


def test_unreadable_configs_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="config.json"):
        model_shape(tmp_path)
    with pytest.raises(ModelError, match="model_type"):
        model_shape({"hidden_size": 8})


def test_big_configs_build_on_the_meta_device_without_memory() -> None:
    shape = model_shape(LLAMA_7B)
    assert 6.7e9 < shape.total_params() < 6.8e9  # Llama-2-7B: 6.74 B parameters
    assert shape.lm_head_params == 32000 * 4096
