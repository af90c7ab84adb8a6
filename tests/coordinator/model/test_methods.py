"""The method table drives the tier builder: the same layer maps as before for the same seed,
and what each method distils and re-aligns."""

from __future__ import annotations

import dataclasses

import pytest

from coordinator.model.methods import (
    FEDOT,
    FEDPETUNING,
    FEDSODA,
    METHODS,
    LayerChoice,
    get_method,
)
from coordinator.model.pipeline import ModelPipeline, tier_spec
from coordinator.model.tiers import FullModel, build_tiers
from coordinator.settings import RunConfig
from shared.errors import ConfigError

# Layer maps the coordinator built before the method table existed (string branches in the
# pipeline), on the 6-layer SmolLM2 cut, 8 Wikipedia paragraphs of 32 tokens, seed 0, SGP blocks
# of 1, tiers pruning 1 and 2 layers. The table must reproduce them exactly.
BEFORE = {
    "fedsoda": {"L5": [0, 1, 2, 4, 5], "L4": [0, 1, 2, 5]},
    "fedot": {"L5": [0, 1, 3, 4, 5], "L4": [0, 1, 4, 5]},
    "fedpetuning": {"L6": [0, 1, 2, 3, 4, 5]},
}


def _config(model_dir, method: str) -> RunConfig:
    base = RunConfig()
    return dataclasses.replace(
        base,
        method=method,
        model=dataclasses.replace(base.model, model=str(model_dir), calibration_samples=8, calibration_seq_len=32),
        pruning=dataclasses.replace(base.pruning, depths=[4, 5], precision="fp32"),
        alignment=dataclasses.replace(base.alignment, pre_align_steps=0),
    )


@pytest.mark.parametrize("method", sorted(BEFORE))
def test_the_table_gives_the_layer_maps_the_string_branches_gave(method, small_model_dir, tmp_path):
    config = _config(small_model_dir, method)
    pipeline = ModelPipeline(config, tmp_path, lambda _m: None)
    full = FullModel(pipeline.full_model, pipeline.tokenizer, pipeline.calibration_batches())
    tierset = build_tiers(full, tier_spec(config), tmp_path)
    assert tierset.layer_maps() == BEFORE[method]
    assert tierset.method == method and bool(tierset.ranking) == (method == "fedsoda")
    assert set(tierset.oda) == set()  # no pre-alignment steps: nothing distilled


def test_what_each_method_distils_and_re_aligns():
    # FedSODA pre-aligns what the config says (re-alignment has its own setting); FedOT distils
    # every layer once and never re-aligns; FedPETuning neither prunes nor distils.
    assert FEDSODA.pre_align_layers("all") == "all" and FEDSODA.pre_align_layers("bridge") == "bridge"
    assert FEDSODA.realigns and FEDSODA.ranks_blocks
    assert FEDOT.pre_align_layers("bridge") == "all" and not FEDOT.realigns and not FEDOT.ranks_blocks
    assert FEDPETUNING.pre_align_layers("all") is None and not FEDPETUNING.realigns
    assert FEDPETUNING.depths(30, [18, 24]) == (30,)
    assert FEDSODA.depths(30, [24, 18, 24]) == (18, 24)
    choice = LayerChoice(num_layers=6, depth=4, ranking=[[3], [4]], block_size=1)
    assert FEDSODA.layer_map(choice) == [0, 1, 2, 5]
    assert FEDPETUNING.layer_map(choice) == list(range(6))
    assert all(m.adapted_layers([0, 2]) == [0, 2] for m in METHODS.values())
    with pytest.raises(ConfigError, match="method must be one of fedsoda, fedot, fedpetuning"):
        get_method("fedx")


def test_a_depth_the_block_size_cannot_reach_is_refused_before_any_work():
    config = dataclasses.replace(RunConfig(), pruning=dataclasses.replace(RunConfig().pruning, depths=[19], block_size=4))
    with pytest.raises(ConfigError, match="depth 19 cannot be reached from 30 layers with blocks of 4"):
        tier_spec(config).resolved_depths(30)
