"""The coordinator's FedKRSO side: the round's seeds, the shapes clients must send, and the
accumulated coordinates exported as a PEFT adapter that is exactly the rebuilt update."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from coordinator.model.export import export_adapter, load_exported_adapter
from coordinator.model.methods import FEDKRSO, FEDPETUNING
from coordinator.model.update_forms import (
    coordinate_shapes,
    lora_view,
    round_training,
    target_matrices,
)
from coordinator.settings import RunConfig, SubspaceSettings
from shared.adapters import LoraSettings
from shared.config import load_config
from shared.errors import ConfigError
from shared.subspace import coordinate_key, rebuild, round_seeds

TARGETS = ("q_proj", "v_proj", "down_proj")
LORA = LoraSettings(rank=8, alpha=16.0, dropout=0.0, target_modules=TARGETS)


def test_fedkrso_rounds_carry_the_seeds_and_rank_other_methods_do_not():
    training = RunConfig().training
    settings = SubspaceSettings(rank=2, seeds_per_round=3)
    assert round_training(FEDPETUNING, training, settings, 7, 4) is training
    krso = round_training(FEDKRSO, training, settings, 7, 4)
    assert krso.subspace_seeds == round_seeds(7, 4, 3) and krso.subspace_rank == 2
    assert round_training(FEDKRSO, training, settings, 7, 5).subspace_seeds != krso.subspace_seeds
    assert dataclasses.replace(krso, subspace_seeds=[], subspace_rank=0) == training


def test_the_config_refuses_seeds_the_coordinator_draws_itself():
    with pytest.raises(ConfigError, match="set subspace.rank and subspace.seeds_per_round instead"):
        load_config(RunConfig, None, overrides={"training.subspace_seeds": [1, 2]})
    with pytest.raises(ConfigError, match="subspace.seeds_per_round in 1..64"):
        load_config(RunConfig, None, overrides={"subspace.seeds_per_round": 65})
    assert load_config(RunConfig, None, overrides={"method": "fedkrso", "subspace.rank": 2}).subspace.rank == 2


def test_expected_shapes_are_every_target_of_the_held_layers_times_the_round_seeds(smol):
    full, _ = smol
    matrices = target_matrices(full, TARGETS)
    assert len(matrices) == 4 * len(TARGETS)
    down = "base_model.model.model.layers.2.mlp.down_proj"
    assert matrices[down] == (full.config.hidden_size, full.config.intermediate_size)
    training = round_training(FEDKRSO, RunConfig().training, SubspaceSettings(rank=3, seeds_per_round=2), 0, 1)
    shapes = coordinate_shapes(matrices, [0, 2], "model.layers", training)
    assert len(shapes) == 2 * len(TARGETS) * 2
    assert shapes[coordinate_key(down, training.subspace_seeds[1])] == (full.config.hidden_size, 3)
    assert not any(".layers.1." in k for k in shapes)


def test_exported_coordinates_load_with_peft_as_the_rebuilt_full_model_update(smol, tmp_path):
    full, tokenizer = smol
    matrices = target_matrices(full, TARGETS)
    gen = torch.Generator().manual_seed(0)
    seeds = round_seeds(0, 0, 2) + round_seeds(0, 1, 2)  # two rounds of history
    coords = {
        coordinate_key(m, s): torch.randn(d_out, 4, generator=gen) * 1e-3 for m, (d_out, _) in matrices.items() for s in seeds
    }
    state, settings = lora_view(FEDKRSO, coords, LORA, matrices)
    assert settings.rank == 16 and settings.scaling == 1.0
    export_adapter(state, full, tmp_path, settings)

    batch = tokenizer(["the film was a delight", "dull and far too long"], return_tensors="pt", padding=True)
    expected_model = copy.deepcopy(full)
    with torch.no_grad():
        modules = dict(expected_model.named_modules())
        for module, update in rebuild(coords, lambda m: matrices[m][1]).items():
            modules[module.removeprefix("base_model.model.")].weight += update
        expected = expected_model(**batch).logits
        loaded = load_exported_adapter(copy.deepcopy(full), tmp_path).eval()
        got = loaded(**batch).logits
        base = full(**batch).logits
    assert not torch.allclose(base, expected, atol=1e-3)  # the update moves the model
    assert torch.allclose(got, expected, atol=1e-4)


def test_a_lora_method_exports_its_adapter_unchanged():
    adapter = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(8, 4)}
    state, settings = lora_view(FEDPETUNING, adapter, LORA, {})
    assert state == adapter and settings is LORA
