"""A tier published in more than one precision: built, re-aligned and reloaded together.

Real packages of the 6-layer SmolLM2 cut (nf4 through bitsandbytes' CPU path, bf16), a real
ODA re-alignment step; nothing mocked.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from coordinator.model.pipeline import ModelPipeline
from coordinator.model.tierset import load_tiers, package_name
from coordinator.settings import PruningSettings, RunConfig
from shared.errors import ConfigError
from shared.subllm import layer_shard_name, read_meta


def _config(model_dir) -> RunConfig:
    base = RunConfig()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, model=str(model_dir), calibration_samples=4, calibration_seq_len=16),
        pruning=dataclasses.replace(base.pruning, depths=[4, 5], precision="nf4", extra_precisions=["bf16"]),
        alignment=dataclasses.replace(base.alignment, pre_align_steps=1, realign_steps=1, batch_size=2),
    )


def test_every_tier_is_packaged_in_each_precision_from_one_aligned_student(small_model_dir, tmp_path):
    pipeline = ModelPipeline.prepare(_config(small_model_dir), tmp_path)
    assert sorted(pipeline.tiers) == ["L4", "L4-bf16", "L5", "L5-bf16"]
    for name, package in pipeline.tiers.items():
        meta = read_meta(package.folder)
        assert meta.precision == package.precision == ("bf16" if name.endswith("-bf16") else "nf4")
        assert meta.tier == name and package.manifest.tier == name and package.tier == name.split("-")[0]
    # The bf16 package holds the aligned student's weights (not the full model's): the same
    # layer as the nf4 package's, which was aligned once per tier.
    deep, deep_bf16 = pipeline.tiers["L5"], pipeline.tiers["L5-bf16"]
    assert deep.kept == deep_bf16.kept
    student = pipeline.tierset.aligned_student(pipeline.full_model, "L5")
    shard = load_file(str(deep_bf16.folder / f"{layer_shard_name(deep.kept[-1])}"))
    (key, value), *_ = sorted((k, v) for k, v in shard.items() if k.endswith("mlp.down_proj.weight"))
    aligned = student.state_dict()[f"model.layers.{len(deep.kept) - 1}.mlp.down_proj.weight"]
    assert value.dtype == torch.bfloat16 and torch.equal(value, aligned.to(torch.bfloat16))
    assert sorted(p.name for p in (tmp_path / "tiers").glob("*/aligned_v1.safetensors")) == ["aligned_v1.safetensors"] * 2
    assert sorted(pipeline.tierset.oda) == ["L4", "L5"]


def test_a_re_alignment_publishes_every_package_of_a_tier_once_aligned(small_model_dir, tmp_path):
    pipeline = ModelPipeline.prepare(_config(small_model_dir), tmp_path)
    tiers = pipeline.realign(pipeline.initial_adapter(), 2)
    assert {t.version for t in tiers.values()} == {2} and len(tiers) == 4
    assert sorted(p.parent.name for p in (tmp_path / "tiers").glob("*/aligned_v*.safetensors")) == ["L4", "L5"]
    assert not list((tmp_path / "tiers").glob("*/aligned_v1.safetensors"))  # the old version is pruned
    reloaded = load_tiers(tmp_path)
    assert {n: (t.precision, t.version) for n, t in reloaded.tiers.items()} == {
        "L4": ("nf4", 2), "L4-bf16": ("bf16", 2), "L5": ("nf4", 2), "L5-bf16": ("bf16", 2)
    }


def test_package_names_and_the_setting_are_checked():
    assert package_name("L18", "nf4", "nf4") == "L18" and package_name("L18", "bf16", "nf4") == "L18-bf16"
    with pytest.raises(ConfigError, match="extra_precisions"):
        PruningSettings(precision="nf4", extra_precisions=["nf4"])
    with pytest.raises(ConfigError, match="extra_precisions must be among"):
        PruningSettings(extra_precisions=["int3"])
