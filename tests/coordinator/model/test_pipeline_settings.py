"""Which layers each distillation trains, per strategy and phase."""

from __future__ import annotations

import dataclasses

from coordinator.model.pipeline import ModelPipeline
from coordinator.settings import RunConfig


def _pipeline(tiny_model_dir, tmp_path, strategy: str) -> ModelPipeline:
    base = RunConfig()
    config = dataclasses.replace(
        base,
        model=dataclasses.replace(base.model, model=str(tiny_model_dir)),
        pruning=dataclasses.replace(base.pruning, strategy=strategy, tiers=[1]),
        alignment=dataclasses.replace(base.alignment, align_layers="all", realign_layers="bridge"),
    )
    return ModelPipeline(config, tmp_path, lambda _message: None)


def test_fedsoda_pre_aligns_and_re_aligns_with_their_own_layer_choice(tiny_model_dir, tmp_path):
    pipeline = _pipeline(tiny_model_dir, tmp_path, "fedsoda")
    assert pipeline._oda_config(3).align_layers == "all"
    # Re-alignment trains only the bridge layers: only their chunks change for the clients.
    assert pipeline._oda_config(3, realign=True).align_layers == "bridge"


def test_fedot_always_distils_every_layer(tiny_model_dir, tmp_path):
    pipeline = _pipeline(tiny_model_dir, tmp_path, "fedot")
    assert pipeline._oda_config(3).align_layers == pipeline._oda_config(3, realign=True).align_layers == "all"
