"""The tier builder and the tier record: build, reload, adopt a prune output, re-align."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from coordinator.model.pipeline import ModelPipeline
from coordinator.model.tierset import (
    RECORD_FILE,
    adopt_tiers,
    check_tiers_fit,
    load_tiers,
    model_fingerprint,
)
from coordinator.settings import RunConfig
from shared.errors import ConfigError, RunStateError
from shared.subllm import read_meta
from tests.coordinator.arch_models import tiny_model


def _config(model_dir, **pruning) -> RunConfig:
    base = RunConfig()
    return dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, model=str(model_dir), calibration_samples=4, calibration_seq_len=16),
        pruning=dataclasses.replace(base.pruning, depths=[2, 3], precision="fp32", **pruning),
        alignment=dataclasses.replace(base.alignment, pre_align_steps=1, realign_steps=1, batch_size=2,
                                      align_layers="all", realign_layers="bridge"),
    )


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    """A run directory whose fedsoda tiers (2 and 3 of 4 layers) were built by the pipeline."""
    run_dir = tmp_path_factory.mktemp("built")
    messages: list[str] = []
    pipeline = ModelPipeline.prepare(_config(tiny_model_dir), run_dir, progress=messages.append)
    return pipeline, run_dir, messages


def test_build_records_nested_tiers_their_packages_and_alignment(prepared):
    pipeline, run_dir, messages = prepared
    tierset = load_tiers(run_dir)
    assert list(tierset.tiers) == ["L2", "L3"]
    assert set(tierset.layer_maps()["L2"]) < set(tierset.layer_maps()["L3"])  # one ranking: nested
    assert tierset.method == "fedsoda" and tierset.ranking and tierset.fingerprint == model_fingerprint(pipeline.full_model)
    for name, tier in tierset.tiers.items():
        assert tier.folder == run_dir / "tiers" / name / "v1" and tier.version == 1
        assert list(read_meta(tier.folder).layer_map) == tier.kept
        assert (run_dir / "tiers" / name / "aligned_v1.safetensors").is_file()
        assert tierset.oda[name]["steps"] == 1 and tierset.oda[name]["trained_layers"] == list(range(len(tier.kept)))
    assert tierset.tiers["L2"].manifest.blob_id == pipeline.tiers["L2"].manifest.blob_id
    assert any(m.startswith("SGP: measuring block distances") for m in messages)
    assert sum(m.startswith("ODA: aligning tier") for m in messages) == 2


def test_adopting_tiers_links_them_into_the_run_and_skips_sgp_and_oda(prepared, tiny_model_dir, tmp_path):
    pipeline, source, _ = prepared
    run_dir = tmp_path / "run"
    messages: list[str] = []
    adopted = ModelPipeline.prepare(_config(tiny_model_dir, tiers_dir=str(source)), run_dir, progress=messages.append)
    assert not any(m.startswith(("SGP", "ODA")) for m in messages), messages
    assert any("reusing the fedsoda tiers prepared in" in m for m in messages)
    assert {n: t.manifest.blob_id for n, t in adopted.tiers.items()} == {n: t.manifest.blob_id for n, t in pipeline.tiers.items()}
    package = next((run_dir / "tiers" / "L2" / "v1").glob("*.safetensors"))
    assert package.stat().st_ino == (source / "tiers" / "L2" / "v1" / package.name).stat().st_ino  # hard link
    record = json.loads((run_dir / RECORD_FILE).read_text())
    assert record["source"] == str(source.resolve())
    # The run directory stands on its own: resuming reads only it.
    resumed = ModelPipeline.prepare(_config(tiny_model_dir), run_dir, resume=True)
    assert resumed.tierset.layer_maps() == pipeline.tierset.layer_maps()


def test_tiers_of_another_model_or_method_are_refused(prepared, tmp_path):
    pipeline, source, _ = prepared
    tierset = load_tiers(source)
    with pytest.raises(ConfigError, match="this run's method is 'fedot'"):
        check_tiers_fit(tierset, pipeline.full_model, "fedot")
    with pytest.raises(ConfigError, match="cut from another model"):
        adopt_tiers(source, tmp_path / "other", tiny_model("llama", num_layers=4), "fedsoda")
    assert not (tmp_path / "other" / "tiers").exists()  # refused before copying anything


def test_missing_or_broken_records_are_clear_errors(prepared, tmp_path):
    _, source, _ = prepared
    with pytest.raises(RunStateError, match="tiers.json is missing: no tiers were prepared"):
        load_tiers(tmp_path)
    (tmp_path / RECORD_FILE).write_text("{not json")
    with pytest.raises(RunStateError, match="not valid JSON"):
        load_tiers(tmp_path)
    record = json.loads((source / RECORD_FILE).read_text())
    record["tiers"]["L2"]["version"] = 7
    (tmp_path / RECORD_FILE).write_text(json.dumps(record))
    with pytest.raises(RunStateError, match="names tier L2 v7, but .* is missing"):
        load_tiers(tmp_path)


def test_realignment_publishes_the_next_version_from_the_aligned_weights(tiny_model_dir, tmp_path):
    pipeline = ModelPipeline.prepare(_config(tiny_model_dir), tmp_path)
    adapter = pipeline.initial_adapter()
    torch.manual_seed(0)
    adapter = {k: (torch.randn_like(v) * 0.01 if "lora_B" in k else v) for k, v in adapter.items()}
    before = {n: t.manifest for n, t in pipeline.tiers.items()}
    tiers = pipeline.realign(adapter, 2)
    assert {t.version for t in tiers.values()} == {2}
    record = load_tiers(tmp_path)
    assert {t.version for t in record.tiers.values()} == {2}
    for name, tier in tiers.items():
        assert (tmp_path / "tiers" / name / "aligned_v2.safetensors").is_file()
        # Re-alignment trains the bridge layers only: the other layers' files are unchanged.
        old = {f.path: f.chunks for f in before[name].files}
        new = {f.path: f.chunks for f in tier.manifest.files}
        changed = {p for p in new if old.get(p) != new[p]}
        layer_files = {p for p in changed if p.startswith("model-layer-")}
        assert 0 < len(layer_files) < len(tier.kept)
        # Disk does not grow with versions: unchanged files are one inode for both versions,
        # and only the current version's aligned weights are kept.
        v1, v2 = tmp_path / "tiers" / name / "v1", tier.folder
        for entry in tier.manifest.files:
            same_inode = (v1 / entry.path).stat().st_ino == (v2 / entry.path).stat().st_ino
            assert same_inode == (entry.path not in changed), entry.path
        assert not (tmp_path / "tiers" / name / "aligned_v1.safetensors").exists()
    # Resume reads the current version's aligned weights.
    resumed = ModelPipeline.prepare(_config(tiny_model_dir), tmp_path, resume=True)
    assert {t.version for t in resumed.tiers.values()} == {2}


def test_a_tier_is_evaluated_as_its_package_with_the_global_adapter_loaded(prepared):
    from peft import get_peft_model_state_dict

    from shared.adapters import to_sub_keys

    pipeline, _, _ = prepared
    torch.manual_seed(1)
    adapter = {k: torch.randn_like(v) * 0.01 for k, v in pipeline.initial_adapter().items()}
    tier = pipeline.tiers["L2"]
    model, _ = pipeline._adapted_tier(tier, adapter)
    loaded = get_peft_model_state_dict(model)
    expected = to_sub_keys(adapter, tier.kept, pipeline.layers_prefix)
    assert set(loaded) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key].float(), value)
