"""Layer maps: tier names, nested tiers from a ranking, depths, the uniform-drop baseline,
bridge layers and per-layer config fields."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shared.errors import ConfigError, ModelError
from shared.layermap import (
    LAYER_MAP_ATTRIBUTE,
    blocks_for_depth,
    bridge_layers,
    check_ranking,
    default_depth,
    kept_layers,
    subset_layer_config,
    tier_name,
    uniform_drop_layers,
    validate_layer_map,
)


def test_tier_is_named_after_the_depth_it_keeps():
    assert tier_name(18) == "L18"
    assert tier_name(len(kept_layers(30, [[5, 6, 7, 8], [9, 10, 11, 12]], 2))) == "L22"


def test_kept_layers_nest_and_refuse_more_blocks_than_ranked():
    ranking = [[1, 2], [3, 4]]
    assert kept_layers(6, ranking, 0) == [0, 1, 2, 3, 4, 5]
    assert kept_layers(6, ranking, 1) == [0, 3, 4, 5]
    assert set(kept_layers(6, ranking, 2)) < set(kept_layers(6, ranking, 1))
    with pytest.raises(ConfigError, match="only 2 non-overlapping blocks"):
        kept_layers(6, ranking, 3)


def test_rankings_are_checked():
    check_ranking(6, [[1, 2], [3, 4]])
    for bad, match in (([[]], "empty"), ([[6]], "outside"), ([[1, 2], [2, 3]], "two ranking blocks"),
                       ([[0, 1, 2], [3, 4, 5]], "every layer")):
        with pytest.raises(ConfigError, match=match):
            check_ranking(6, bad)


def test_depths_and_blocks():
    assert blocks_for_depth(30, 18, 4) == 3
    assert blocks_for_depth(30, 30, 4) == 0
    for depth in (19, 31, 0):
        with pytest.raises(ConfigError):
            blocks_for_depth(30, depth, 4 if depth != 0 else 30)
    assert default_depth(30, 4) == 18
    assert default_depth(30, 1) == 18
    assert default_depth(4, 1) == 2


def test_uniform_drop_layers():
    kept = uniform_drop_layers(30, 18)
    assert len(kept) == 18 and kept == sorted(set(kept))
    assert kept[:2] == [0, 1] and kept[-2:] == [28, 29]
    gaps = [b - a for a, b in zip(kept[2:-2], kept[3:-2])]
    assert max(gaps) - min(gaps) <= 1  # evenly spread
    assert uniform_drop_layers(10, 4) == [0, 1, 8, 9]
    assert uniform_drop_layers(10, 10) == list(range(10))
    assert uniform_drop_layers(10, 5) == [0, 1, 5, 8, 9]
    # Too shallow to keep two layers at each end: it keeps depth // 2 at each end.
    assert uniform_drop_layers(10, 3) == [0, 5, 9]
    assert uniform_drop_layers(6, 1) == [3]
    for depth in (0, 11):
        with pytest.raises(ModelError):
            uniform_drop_layers(10, depth)


def test_bridge_layers_and_layer_map_validation():
    assert bridge_layers([0, 1, 4, 5, 9]) == [2, 4]
    assert bridge_layers([2, 3]) == [0]
    assert bridge_layers([0, 1, 2]) == []
    assert validate_layer_map((0, 2), 3) == [0, 2]
    for bad in ([], [0, 0, 1], [2, 1], [0, 9]):
        with pytest.raises(ModelError):
            validate_layer_map(bad, 4)


class _Config(SimpleNamespace):
    def to_dict(self):
        return dict(vars(self))


def test_per_layer_config_lists_are_cut_and_others_left_alone():
    config = _Config(
        num_hidden_layers=4,
        layer_types=["full", "sliding", "full", "sliding"],
        sliding_window_pattern_list=[1, 2, 3, 4],
        architectures=["A", "B", "C", "D"],  # four entries, but never per layer
        hidden_sizes=[8, 8, 8, 8],  # not named after layers: kept whole
        **{LAYER_MAP_ATTRIBUTE: [0, 1, 2, 3]},
    )
    changed = subset_layer_config(config, [0, 3], 4)
    assert config.num_hidden_layers == 2
    assert config.layer_types == ["full", "sliding"] and config.sliding_window_pattern_list == [1, 4]
    assert config.architectures == ["A", "B", "C", "D"] and config.hidden_sizes == [8, 8, 8, 8]
    assert getattr(config, LAYER_MAP_ATTRIBUTE) == [0, 1, 2, 3]  # the caller records the map
    assert set(changed) == {"num_hidden_layers", "layer_types", "sliding_window_pattern_list"}
    with pytest.raises(ModelError, match="scale_attn_by_inverse_layer_idx"):
        subset_layer_config(_Config(num_hidden_layers=2, scale_attn_by_inverse_layer_idx=True), [0], 2)
