"""Cut copies of a model: real weights of the first layers, a config that reloads."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from coordinator.model.models import cut_model_copy
from shared.errors import ModelError
from tests.coordinator.arch_models import tiny_model


@pytest.mark.parametrize("arch", ["qwen2", "gemma2"])
def test_cut_copy_of_a_model_with_per_layer_config_lists(arch, tmp_path, tiny_model_dir):
    full = tiny_model(arch, num_layers=6)
    assert len(full.config.layer_types) == 6
    source = tmp_path / "full"
    full.save_pretrained(source)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(source)

    cut = AutoModelForCausalLM.from_pretrained(cut_model_copy(source, tmp_path / "cut", 2))
    assert cut.config.num_hidden_layers == 2
    assert cut.config.layer_types == full.config.layer_types[:2]
    for key, value in cut.state_dict().items():  # the kept layers are the full model's first two
        torch.testing.assert_close(value, full.state_dict()[key])
    with pytest.raises(ModelError, match="cannot keep 7"):
        cut_model_copy(source, tmp_path / "too-deep", 7)
