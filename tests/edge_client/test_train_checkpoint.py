"""Checkpoints of an interrupted round (edge_client.train_checkpoint): the files round-trip and
refuse corruption, and a round resumed from one ends bit for bit as if it had never stopped."""

from __future__ import annotations

import json

import pytest
import torch

from edge_client.train_checkpoint import (
    CHECKPOINT_TENSORS,
    TrainCheckpoint,
    load_checkpoint,
    params_dict,
    save_checkpoint,
)
from edge_client.trainer import TrainOptions, train_adapter
from shared.errors import RunStateError
from tests.edge_client.helpers import (
    PREFIX,
    SUB_MAP,
    has_lora,
    make_params,
    random_global_adapter,
)


def test_resume_after_a_crash_gives_the_same_delta(fp32, rt_dataset, tmp_path):
    """Dropout on, so the RNG state must be restored too; the result must match bit for bit."""
    model, tokenizer = fp32
    params = make_params(local_steps=4, lora_dropout=0.1, seed=3)
    global_adapter = random_global_adapter(SUB_MAP, seed=2)
    kwargs = dict(round_num=5, checkpoint_every=2)
    straight = train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu", options=TrainOptions(checkpoint_dir=tmp_path / "a", **kwargs))

    def crash(progress):
        if progress.step == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu", options=TrainOptions(progress_cb=crash, checkpoint_dir=tmp_path / "b", **kwargs))
    assert not has_lora(model)
    state = load_checkpoint(tmp_path / "b")
    assert state is not None and state.step == 2 and state.round_num == 5 and len(state.losses) == 2
    resumed = train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=state, checkpoint_dir=tmp_path / "b", **kwargs))
    assert set(resumed.delta) == set(straight.delta)
    assert all(torch.equal(resumed.delta[k], straight.delta[k]) for k in straight.delta)
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 4
    assert resumed.metrics["loss_first"] == straight.metrics["loss_first"]
    assert resumed.metrics["loss_last"] == straight.metrics["loss_last"]
    # A different global adapter, round or params must not silently reuse the checkpoint.
    with pytest.raises(RunStateError, match="different global adapter"):
        train_adapter(model, tokenizer, rt_dataset, params, random_global_adapter(SUB_MAP, seed=9), SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=state, round_num=5))
    with pytest.raises(RunStateError, match="round 5, not round 6"):
        train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=state, round_num=6))
    with pytest.raises(RunStateError, match="other TrainingParams"):
        train_adapter(model, tokenizer, rt_dataset, make_params(local_steps=5), global_adapter, SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=state, round_num=5))


def test_checkpoint_files_roundtrip_and_reject_corruption(tmp_path):
    state = TrainCheckpoint(
        round_num=1,
        step=3,
        params=params_dict(make_params()),
        adapter={"a.lora_A.weight": torch.randn(2, 3)},
        global_adapter={"a.lora_A.weight": torch.zeros(2, 3)},
        optimizer={"0.step": torch.tensor(3.0), "0.exp_avg": torch.randn(2, 3), "0.exp_avg_sq": torch.rand(2, 3)},
        rng={"cpu": torch.get_rng_state()},
        losses=(1.0, 0.5, 0.25),
        grad_norms=(1.0, 1.0, 1.0),
        step_seconds=(0.1, 0.1, 0.1),
        answer_tokens=6,
    )
    assert load_checkpoint(tmp_path) is None
    save_checkpoint(tmp_path, state)
    loaded = load_checkpoint(tmp_path)
    assert loaded.params == state.params and loaded.losses == state.losses and loaded.answer_tokens == 6
    for group in ("adapter", "global_adapter", "optimizer", "rng"):
        ours, theirs = getattr(state, group), getattr(loaded, group)
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.optimizer["0.step"].shape == ()
    meta = json.loads((tmp_path / "train_state.json").read_text())
    assert meta["round"] == 1 and meta["step"] == 3
    raw = bytearray((tmp_path / CHECKPOINT_TENSORS).read_bytes())
    raw[-1] ^= 0xFF
    (tmp_path / CHECKPOINT_TENSORS).write_bytes(bytes(raw))
    with pytest.raises(RunStateError, match="does not match"):
        load_checkpoint(tmp_path)
