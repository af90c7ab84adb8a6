"""Canonical adapter keys: sub-LLM <-> full-LLM layer index mapping, LoRA deltas."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from shared.adapters import (
    LoraSettings,
    adapted_layers,
    layer_index,
    lora_deltas,
    to_full_keys,
    to_sub_keys,
)
from shared.errors import ConfigError, TensorError


def key(prefix: str, i: int, module: str = "self_attn.q_proj", part: str = "lora_A") -> str:
    return f"base_model.model.{prefix}.{i}.{module}.{part}.weight"


def test_layer_index_matches_only_the_layer_list():
    assert layer_index(key("model.layers", 17), "model.layers") == 17
    assert layer_index(key("transformer.h", 3, "attn.c_attn"), "transformer.h") == 3
    assert layer_index("model.layers.5.mlp.up_proj.lora_B.weight", "model.layers") == 5
    # Look-alikes are not the layer list.
    assert layer_index("base_model.model.mymodel.layers.3.x.lora_A.weight", "model.layers") is None
    assert layer_index("base_model.model.model.layers_norm.3.x.lora_A.weight", "model.layers") is None
    assert layer_index("base_model.model.lm_head.lora_A.weight", "model.layers") is None


def test_to_full_and_back():
    layer_map = [0, 1, 4, 5, 9]
    sub = {key("model.layers", i, part=p): torch.full((2, 2), float(10 * i + j)) for i in range(5) for j, p in enumerate(("lora_A", "lora_B"))}
    sub["base_model.model.lm_head.lora_A.weight"] = torch.zeros(1)
    full = to_full_keys(sub, layer_map, "model.layers")
    assert set(full) == {key("model.layers", layer_map[i], part=p) for i in range(5) for p in ("lora_A", "lora_B")} | {
        "base_model.model.lm_head.lora_A.weight"
    }
    for i, k in enumerate(layer_map):
        assert full[key("model.layers", k)] is sub[key("model.layers", i)]
    assert adapted_layers(full, "model.layers") == layer_map
    back = to_sub_keys(full, layer_map, "model.layers")
    assert back.keys() == sub.keys()
    assert all(back[k] is sub[k] for k in sub)


def test_to_sub_keys_drops_layers_the_tier_does_not_hold():
    full = {key("model.layers", i): torch.zeros(1) for i in range(10)}
    sub = to_sub_keys(full, [0, 3, 9], "model.layers")
    assert sorted(sub) == sorted(key("model.layers", i) for i in range(3))


def test_to_full_keys_rejects_layers_outside_the_map():
    with pytest.raises(TensorError, match="only 2 layers"):
        to_full_keys({key("model.layers", 2): torch.zeros(1)}, [0, 5], "model.layers")


@given(
    kept=st.lists(st.integers(0, 40), min_size=1, max_size=20, unique=True).map(sorted),
    prefix=st.sampled_from(["model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"]),
)
def test_round_trip_property(kept, prefix):
    sub = {key(prefix, i, part=p): torch.tensor([float(i)]) for i in range(len(kept)) for p in ("lora_A", "lora_B")}
    full = to_full_keys(sub, kept, prefix)
    assert adapted_layers(full, prefix) == kept
    assert to_sub_keys(full, kept, prefix) == sub


def test_lora_deltas_math_and_errors():
    settings = LoraSettings(rank=2, alpha=8.0, target_modules=("q_proj",))
    a = torch.randn(2, 5)
    b = torch.randn(3, 2)
    state = {key("model.layers", 1): a, key("model.layers", 1, part="lora_B"): b}
    deltas = lora_deltas(state, settings)
    assert list(deltas) == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(deltas["model.layers.1.self_attn.q_proj"], 4.0 * b @ a)
    rs = LoraSettings(rank=4, alpha=8.0, use_rslora=True)
    assert rs.scaling == pytest.approx(4.0)
    with pytest.raises(TensorError, match="partner"):
        lora_deltas({key("model.layers", 1): a}, settings)
    with pytest.raises(TensorError, match="do not chain"):
        lora_deltas({key("model.layers", 1): a, key("model.layers", 1, part="lora_B"): torch.randn(3, 4)}, settings)


def test_lora_settings_validation():
    assert LoraSettings(target_modules=["q_proj", "v_proj"]).target_modules == ("q_proj", "v_proj")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LoraSettings(rank=0)
    with pytest.raises(ConfigError):
        LoraSettings(target_modules=())
