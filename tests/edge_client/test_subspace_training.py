"""FedKRSO's client (edge_client.subspace through edge_client.trainer) on a real 4-layer cut of
SmolLM2 and real Rotten Tomatoes sentences: the uploaded coordinates are exactly the update the
client trained, in the canonical subspaces, one subspace per step, on top of the history, with
the model handed back untouched; bad rounds are refused and interrupted rounds resume exactly.

The 4-bit test loads NF4 weights with bitsandbytes on the CPU (as tests/edge_client/test_lora.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from edge_client.inbound import check_adapter, check_training
from edge_client.subspace import SubspaceLinear, active_seed
from edge_client.train_checkpoint import load_checkpoint
from edge_client.trainer import TrainOptions, round_seed, train_adapter
from shared.adapters import PEFT_PREFIX
from shared.errors import FieldTypeError, ModelError, RunStateError, TensorError
from shared.protocol import GlobalAdapter
from shared.subspace import coordinate_key, projection, rebuild, split_key
from shared.tensors import state_to_payloads
from tests.edge_client.helpers import PREFIX, SUB_MAP, TARGETS, make_params

SEEDS = [1234567, 89, 4242]
RANK = 4
OUT = {"q_proj": 576, "v_proj": 192}
D_IN = 576  # SmolLM2-135M's hidden size: q_proj and v_proj both read it


def _params(**overrides):
    values = {"local_steps": 3, "subspace_rank": RANK, "subspace_seeds": SEEDS}
    values.update(overrides)
    return make_params(**values)


def _history(layers, seeds=(777, 778), rank=RANK, scale=0.05, gen_seed=0) -> dict[str, torch.Tensor]:
    """Nonzero canonical coordinates of past rounds for the given full-LLM layers."""
    gen = torch.Generator().manual_seed(gen_seed)
    out = {}
    for layer in layers:
        for name in TARGETS:
            module = f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{name}"
            for seed in seeds:
                out[coordinate_key(module, seed)] = torch.randn(OUT[name], rank, generator=gen) * scale
    return out


def _wrappers(model) -> dict[str, SubspaceLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, SubspaceLinear)}


def _canonical(sub_name: str) -> str:
    """``model.layers.<i>.self_attn.q_proj`` of the sub-LLM -> its canonical module key under SUB_MAP."""
    parts = sub_name.split(".")
    parts[2] = str(SUB_MAP[int(parts[2])])
    return PEFT_PREFIX + ".".join(parts)


def _state(model) -> dict:
    """What training must hand back: module objects, parameter values and flags, mode, cache setting."""
    return {
        "modules": {name: id(m) for name, m in model.named_modules()},
        "weights": {n: p.detach().clone() for n, p in model.named_parameters() if ".layers." in n},
        "flags": [p.requires_grad for p in model.parameters()],
        "training": model.training,
        "use_cache": model.config.use_cache,
    }


def _assert_as_found(model, before: dict) -> None:
    after = _state(model)
    assert not _wrappers(model)
    assert after["modules"] == before["modules"]  # the very same module objects, nothing added
    assert after["flags"] == before["flags"] and after["training"] == before["training"]
    assert after["use_cache"] == before["use_cache"]
    assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())


def test_uploaded_coordinates_rebuild_to_the_update_the_client_trained(fp32, rt_dataset):
    """Probe every wrapped layer at the last step: its effective update (layer(I) - base(I))
    must be the coordinator's rebuild of history + delta, with canonical projections."""
    model, tokenizer = fp32
    history = _history([2, 17, 5])  # 5: a full-LLM layer this sub-LLM does not hold
    params = _params()
    effective: dict[str, torch.Tensor] = {}
    projections: dict[str, torch.Tensor] = {}

    def probe(progress):
        if progress.step != progress.total_steps:
            return
        eye = torch.eye(D_IN)
        with torch.no_grad():
            for name, wrapper in _wrappers(model).items():
                effective[_canonical(name)] = (wrapper(eye) - wrapper.base(eye)).T
                projections[name] = wrapper.projections.clone()

    result = train_adapter(model, tokenizer, rt_dataset, params, history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(progress_cb=probe))
    expected_keys = {
        coordinate_key(f"{PEFT_PREFIX}model.layers.{layer}.self_attn.{name}", seed)
        for layer in SUB_MAP
        for name in TARGETS
        for seed in SEEDS
    }
    assert set(result.delta) == expected_keys  # canonical layers, every target x every seed
    for key, value in result.delta.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        assert tuple(value.shape) == (OUT[split_key(key)[0].rsplit(".", 1)[-1]], RANK)
    held_history = {k: v for k, v in history.items() if ".layers.5." not in k}
    rebuilt = rebuild({**held_history, **result.delta}, lambda module: D_IN)
    assert set(rebuilt) == set(effective) and len(effective) == 8
    for module, update in rebuilt.items():
        torch.testing.assert_close(effective[module], update, atol=1e-5, rtol=1e-4)
    # Sub-LLM layer 1 is full-LLM layer 9: its projections are layer 9's, not layer 1's.
    a = projections["model.layers.1.self_attn.q_proj"]
    canonical, local = (f"{PEFT_PREFIX}model.layers.{i}.self_attn.q_proj" for i in (9, 1))
    assert torch.equal(a[-RANK:], projection(SEEDS[-1], canonical, RANK, D_IN))
    assert not torch.equal(a[-RANK:], projection(SEEDS[-1], local, RANK, D_IN))
    assert a.shape == (RANK * len(SEEDS), D_IN)  # layer 9 has no history
    assert projections["model.layers.0.self_attn.q_proj"].shape == (RANK * (len(SEEDS) + 2), D_IN)


def test_one_subspace_moves_per_step_and_the_model_comes_back_as_found(fp32, rt_dataset):
    model, tokenizer = fp32
    model.config.use_cache = True
    before = _state(model)
    result = train_adapter(model, tokenizer, rt_dataset, _params(local_steps=1), None, SUB_MAP, PREFIX, "cpu", options=TrainOptions(round_num=4))
    moved = {split_key(k)[1] for k, v in result.delta.items() if torch.count_nonzero(v) > 0}
    expected = SEEDS[active_seed(round_seed(0, 4), 0, len(SEEDS))]
    assert moved == {expected}
    # Every target module moved along that seed (the step reaches all of them).
    assert sum(1 for k, v in result.delta.items() if torch.count_nonzero(v) > 0) == len(SUB_MAP) * len(TARGETS)
    _assert_as_found(model, before)


def test_active_seed_cycles_through_every_seed_deterministically():
    picks = [active_seed(99, step, 3) for step in range(30)]
    assert picks == [active_seed(99, step, 3) for step in range(30)]
    for cycle in range(10):
        assert sorted(picks[3 * cycle : 3 * cycle + 3]) == [0, 1, 2]
    assert picks != [active_seed(100, step, 3) for step in range(30)]
    assert {active_seed(7, step, 1) for step in range(5)} == {0}


def test_history_is_applied_and_a_key_of_a_layer_not_held_is_ignored(fp32, rt_dataset):
    model, tokenizer = fp32
    params = _params(local_steps=2)
    previous = train_adapter(model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu", options=TrainOptions(round_num=0))
    runs = {}
    for name, history in {
        "none": None,
        "previous": previous.delta,
        "plus_foreign": {**previous.delta, **_history([5])},  # full-LLM layer 5 is not in SUB_MAP
    }.items():
        runs[name] = train_adapter(model, tokenizer, rt_dataset, params, history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(round_num=1))
    assert abs(runs["previous"].metrics["loss_first"] - runs["none"].metrics["loss_first"]) > 1e-3
    same = ("loss_first", "loss_last", "grad_norm_first", "grad_norm_last", "delta_norm")
    assert all(runs["plus_foreign"].metrics[m] == runs["previous"].metrics[m] for m in same)
    assert all(torch.equal(runs["plus_foreign"].delta[k], v) for k, v in runs["previous"].delta.items())


def _bad_history(kind: str) -> dict[str, torch.Tensor]:
    history = _history([2])
    key = next(iter(history))
    if kind == "d_out":
        history[key] = torch.zeros(100, RANK)
    elif kind == "not_2d":
        history[key] = torch.zeros(OUT["q_proj"] * RANK)
    elif kind == "nan":
        history[key] = torch.full((OUT["q_proj"], RANK), float("nan"))
    elif kind == "lora_key":
        history[f"{PEFT_PREFIX}model.layers.2.self_attn.q_proj.lora_A.weight"] = torch.zeros(8, D_IN)
    elif kind == "not_a_target":
        history[coordinate_key(f"{PEFT_PREFIX}model.layers.2.self_attn.k_proj", 5)] = torch.zeros(192, RANK)
    return history


@pytest.mark.parametrize(
    ("overrides", "history", "match"),
    [
        ({"subspace_rank": 0}, None, "subspace_rank in 1"),
        ({"subspace_seeds": list(range(65))}, None, "at most 64 subspaces"),
        ({"subspace_seeds": [3, 4, 3]}, None, "seeds repeat"),
        ({"subspace_seeds": [-1]}, None, "must lie in"),
        ({"target_modules": ["no_such_proj"]}, None, "no target module"),
        ({}, "d_out", r"have shape \(100, 4\)"),
        ({}, "not_2d", r"have shape \(2304,\)"),
        ({}, "nan", "NaN or Inf"),
        ({}, "lora_key", "subspace coordinates only"),
        ({}, "not_a_target", "no target module of this round"),
    ],
)
def test_bad_rounds_are_refused_and_leave_the_model_alone(fp32, rt_dataset, overrides, history, match):
    model, tokenizer = fp32
    before = _state(model)
    global_adapter = _bad_history(history) if history else None
    with pytest.raises(ModelError, match=match):
        train_adapter(model, tokenizer, rt_dataset, _params(**overrides), global_adapter, SUB_MAP, PREFIX, "cpu")
    _assert_as_found(model, before)


def test_inbound_checks_accept_coordinates_and_refuse_bad_ones():
    good = _history([2])
    check_adapter(GlobalAdapter(round=3, tensors=state_to_payloads(good)))
    mixed = {**good, f"{PEFT_PREFIX}model.layers.2.self_attn.q_proj.lora_A.weight": torch.zeros(8, D_IN)}
    check_adapter(GlobalAdapter(round=3, tensors=state_to_payloads(mixed)))
    key = next(iter(good))
    with pytest.raises(TensorError, match="holds NaN or Inf"):
        check_adapter(GlobalAdapter(round=3, tensors=state_to_payloads({key: torch.full((4, 4), float("inf"))})))
    with pytest.raises(TensorError, match=r"not a LoRA weight key .* nor a subspace coordinate key"):
        check_adapter(GlobalAdapter(round=3, tensors=state_to_payloads({f"{key}x": torch.zeros(2, 2)})))
    with pytest.raises(TensorError, match="has dtype int8"):
        check_adapter(GlobalAdapter(round=3, tensors=state_to_payloads({key: torch.zeros(2, 2, dtype=torch.int8)})))
    check_training(_params())
    with pytest.raises(FieldTypeError, match="seeds repeat"):
        check_training(_params(subspace_seeds=[1, 1]))
    with pytest.raises(FieldTypeError, match="subspace_rank in 1"):
        check_training(_params(subspace_rank=0))


def test_resume_after_a_crash_gives_the_same_coordinates(fp32, rt_dataset, tmp_path):
    """The active seed of every step and AdamW's per-seed state must carry over: the resumed
    round ends bit for bit as the straight one."""
    model, tokenizer = fp32
    params = _params(local_steps=4, seed=3)
    history = _history([2, 9])
    kwargs = {"round_num": 5, "checkpoint_every": 2}
    straight = train_adapter(model, tokenizer, rt_dataset, params, history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(checkpoint_dir=tmp_path / "a", **kwargs))

    def crash(progress):
        if progress.step == 3:
            raise KeyboardInterrupt("simulated crash")

    before = _state(model)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(model, tokenizer, rt_dataset, params, history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(progress_cb=crash, checkpoint_dir=tmp_path / "b", **kwargs))
    _assert_as_found(model, before)
    state = load_checkpoint(tmp_path / "b")
    assert state is not None and state.step == 2
    assert all(torch.count_nonzero(v) == 0 for v in state.global_adapter.values())  # the start is zero
    resumed = train_adapter(model, tokenizer, rt_dataset, params, history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=state, checkpoint_dir=tmp_path / "b", **kwargs))
    assert set(resumed.delta) == set(straight.delta)
    assert all(torch.equal(resumed.delta[k], straight.delta[k]) for k in straight.delta)
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["loss_last"] == straight.metrics["loss_last"]
    # Another layout, or another round's seeds, must not reuse the checkpoint.
    dropped = next(iter(state.adapter))
    other = dataclasses.replace(
        state,
        adapter={k: v for k, v in state.adapter.items() if k != dropped},
        global_adapter={k: v for k, v in state.global_adapter.items() if k != dropped},
    )
    with pytest.raises(RunStateError, match="another LoRA layout"):
        train_adapter(model, tokenizer, rt_dataset, params, history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=other, round_num=5))
    with pytest.raises(RunStateError, match="other TrainingParams"):
        train_adapter(model, tokenizer, rt_dataset, _params(local_steps=4, seed=3, subspace_seeds=[1, 2, 3]), history, SUB_MAP, PREFIX, "cpu", options=TrainOptions(resume_state=state, round_num=5))
    _assert_as_found(model, before)


def test_nf4_subspace_training_runs_and_leaves_the_4bit_weights_alone(tiny_model_dir, rt_dataset):
    import bitsandbytes as bnb

    from coordinator.model.models import load_model
    from tests.edge_client.test_lora import _load_nf4

    nf4 = _load_nf4(tiny_model_dir)
    tokenizer = load_model(tiny_model_dir)[1]
    packed = {n: m.weight.data.clone() for n, m in nf4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    result = train_adapter(nf4, tokenizer, rt_dataset, _params(local_steps=2), _history([2]), SUB_MAP, PREFIX, "cpu")
    assert all(torch.isfinite(v).all() for v in result.delta.values()) and result.metrics["delta_norm"] > 0
    assert not _wrappers(nf4)
    after = {n: m for n, m in nf4.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert set(after) == set(packed)
    assert all(torch.equal(after[n].weight.data, w) for n, w in packed.items())
