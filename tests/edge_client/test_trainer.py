"""Local QLoRA training (edge_client.trainer) on a real 4-layer cut of SmolLM2 and real
Rotten Tomatoes sentences. Each test takes a handful of steps at batch 2, seq 64.

The 4-bit tests load NF4 weights with bitsandbytes on the CPU and apply the AVX512_BF16
workaround right after (``shared.subllm.disable_cpu_4bit_repacking``, which ``load_package`` uses).
The CUDA test skips itself without a GPU.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from coordinator.model.datasets import movie_reviews, train_test_split
from coordinator.model.models import load_model
from edge_client.data import (
    LocalDataset,
    batch_indices,
    dataset_from_records,
    make_batch,
)
from edge_client.trainer import (
    CHECKPOINT_TENSORS,
    TrainCheckpoint,
    adapter_parameters,
    attach_lora,
    detach_lora,
    load_checkpoint,
    params_dict,
    round_seed,
    save_checkpoint,
    train_adapter,
)
from shared.errors import DataError, ModelError, RunStateError
from shared.protocol import TrainingParams
from shared.subllm import disable_cpu_4bit_repacking
from shared.tasks import TaskFormat

PREFIX = "model.layers"
SUB_MAP = [2, 9, 17, 29]  # a non-identity layer map: sub-LLM layer i is full-LLM layer SUB_MAP[i]
TARGETS = ["q_proj", "v_proj"]


def _params(**overrides) -> TrainingParams:
    values = dict(
        local_steps=2,
        learning_rate=2e-3,
        batch_size=2,
        seq_len=64,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        target_modules=TARGETS,
        mu=0.0,
        seed=0,
    )
    values.update(overrides)
    return TrainingParams(**values)


@pytest.fixture(scope="module")
def fp32(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def rt_dataset() -> LocalDataset:
    train, _ = train_test_split(movie_reviews("rotten_tomatoes"), test_fraction=0.2, seed=0)
    return dataset_from_records(train[:64], source="rotten_tomatoes")


def _has_lora(model: torch.nn.Module) -> bool:
    return any("lora" in name for name, _ in model.named_modules())


def _load_nf4(path: Path) -> torch.nn.Module:
    """NF4 on CPU via transformers, with the AVX512_BF16 workaround applied right after loading."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32, device_map="cpu")
    assert disable_cpu_4bit_repacking(model) == 28  # 4 layers x 7 projections
    return model


def _dequantized_copy(nf4: torch.nn.Module, path: Path) -> torch.nn.Module:
    """An fp32 model whose linear weights are exactly the NF4 weights, dequantized."""
    import bitsandbytes as bnb

    ref, _ = load_model(path)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, module in nf4.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                modules[name].weight.copy_(weight.float())
    return ref


def _random_global_adapter(layers, rank: int = 8, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """Nonzero canonical-key LoRA tensors for the given full-LLM layers (SmolLM2 shapes)."""
    out_features = {"q_proj": 576, "v_proj": 192}
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for layer in layers:
        for module in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(rank, 576, generator=gen) * scale
            adapter[f"{key}.lora_B.weight"] = torch.randn(out_features[module], rank, generator=gen) * scale
    return adapter


def test_loss_decreases_on_rotten_tomatoes_and_model_is_restored(fp32, rt_dataset):
    model, tokenizer = fp32
    flags = [p.requires_grad for p in model.parameters()]
    losses = []
    params = _params(local_steps=8)
    result = train_adapter(
        model, tokenizer, rt_dataset, params, None, [0, 1, 2, 3], PREFIX, "cpu", progress_cb=lambda p: losses.append(p.loss)
    )
    assert len(losses) == 8 and result.metrics["steps"] == 8
    assert result.metrics["loss_first"] == losses[0] and result.metrics["loss_last"] == losses[-1]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert result.num_examples == len(rt_dataset) == 64
    assert result.metrics["answer_tokens"] == 16  # one label-word token per example, 8 steps x 2
    # The base model comes back bare: no LoRA modules, same mode, same requires_grad flags.
    assert not _has_lora(model) and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_proximal_term_keeps_the_delta_near_the_global_adapter(fp32, rt_dataset):
    model, tokenizer = fp32
    free = train_adapter(model, tokenizer, rt_dataset, _params(local_steps=4, mu=0.0), None, SUB_MAP, PREFIX, "cpu")
    tied = train_adapter(model, tokenizer, rt_dataset, _params(local_steps=4, mu=1e4), None, SUB_MAP, PREFIX, "cpu")
    assert tied.metrics["delta_norm"] < 0.3 * free.metrics["delta_norm"], (tied.metrics, free.metrics)
    assert free.metrics["delta_norm"] > 0


def test_delta_has_canonical_full_llm_keys(fp32, rt_dataset):
    model, tokenizer = fp32
    result = train_adapter(model, tokenizer, rt_dataset, _params(local_steps=1), None, SUB_MAP, PREFIX, "cpu")
    expected = {
        f"base_model.model.model.layers.{layer}.self_attn.{module}.lora_{ab}.weight"
        for layer in SUB_MAP
        for module in TARGETS
        for ab in "AB"
    }
    assert set(result.delta) == expected
    for key, value in result.delta.items():
        assert value.dtype == torch.float32 and value.device.type == "cpu"
        out = 576 if "q_proj" in key else 192
        assert tuple(value.shape) == ((8, 576) if "lora_A" in key else (out, 8))
    # A fresh adapter has B = 0, so the first step moves only B (dL/dA is proportional to B).
    assert all(torch.count_nonzero(v) > 0 for k, v in result.delta.items() if "lora_B" in k)
    assert all(torch.count_nonzero(v) == 0 for k, v in result.delta.items() if "lora_A" in k)


def test_global_adapter_is_loaded_and_used(fp32, rt_dataset):
    """With lr 0 the first step's loss must equal the loss of the base model with the global
    adapter merged into its weights by hand (independent of PEFT), and the delta must be 0."""
    model, tokenizer = fp32
    params = _params(local_steps=1, learning_rate=0.0)
    global_adapter = _random_global_adapter(SUB_MAP + [5])  # layer 5 is not in this sub-LLM: ignored
    result = train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu")
    assert all(torch.count_nonzero(v) == 0 for v in result.delta.values())

    merged = copy.deepcopy(model)
    scaling = params.lora_alpha / params.lora_rank
    with torch.no_grad():
        for sub, full in enumerate(SUB_MAP):
            for module in TARGETS:
                key = f"base_model.model.model.layers.{full}.self_attn.{module}"
                linear = getattr(merged.model.layers[sub].self_attn, module)
                linear.weight += scaling * global_adapter[f"{key}.lora_B.weight"] @ global_adapter[f"{key}.lora_A.weight"]
    indices = batch_indices(len(rt_dataset), params.batch_size, round_seed(params.seed, 0), 0)
    batch = make_batch(rt_dataset, tokenizer, indices, params.seq_len)
    with torch.no_grad():
        expected = merged(**batch).loss.item()
        bare = model(**batch).loss.item()
    assert result.metrics["loss_first"] == pytest.approx(expected, rel=1e-5)
    assert abs(bare - expected) > 1e-3  # the adapter changes the loss, so the check above has teeth


def test_global_adapter_that_does_not_fit_is_refused(fp32, rt_dataset):
    model, tokenizer = fp32
    params = _params(local_steps=1)
    with pytest.raises(ModelError, match="shape"):
        train_adapter(model, tokenizer, rt_dataset, params, _random_global_adapter(SUB_MAP, rank=4), SUB_MAP, PREFIX, "cpu")
    with pytest.raises(ModelError, match="missing"):
        train_adapter(model, tokenizer, rt_dataset, params, _random_global_adapter(SUB_MAP[:2]), SUB_MAP, PREFIX, "cpu")
    broken = _random_global_adapter(SUB_MAP)
    next(iter(broken.values()))[0, 0] = float("nan")
    with pytest.raises(ModelError, match="NaN"):
        train_adapter(model, tokenizer, rt_dataset, params, broken, SUB_MAP, PREFIX, "cpu")
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(ModelError, match="target modules"):
        train_adapter(model, tokenizer, rt_dataset, _params(target_modules=["no_such_proj"]), None, SUB_MAP, PREFIX, "cpu")
    assert [p.requires_grad for p in model.parameters()] == flags
    with pytest.raises(DataError, match="no examples"):
        train_adapter(model, tokenizer, LocalDataset(TaskFormat.GENERATION, (), "empty"), params, None, SUB_MAP, PREFIX, "cpu")
    assert not _has_lora(model)


def test_resume_after_a_crash_gives_the_same_delta(fp32, rt_dataset, tmp_path):
    """Dropout on, so the RNG state must be restored too; the result must match bit for bit."""
    model, tokenizer = fp32
    params = _params(local_steps=4, lora_dropout=0.1, seed=3)
    global_adapter = _random_global_adapter(SUB_MAP, seed=2)
    kwargs = dict(round_num=5, checkpoint_every=2)
    straight = train_adapter(
        model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu", checkpoint_dir=tmp_path / "a", **kwargs
    )

    def crash(progress):
        if progress.step == 3:
            raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        train_adapter(
            model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu",
            progress_cb=crash, checkpoint_dir=tmp_path / "b", **kwargs,
        )
    assert not _has_lora(model)
    state = load_checkpoint(tmp_path / "b")
    assert state is not None and state.step == 2 and state.round_num == 5 and len(state.losses) == 2
    resumed = train_adapter(
        model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu",
        resume_state=state, checkpoint_dir=tmp_path / "b", **kwargs,
    )
    assert set(resumed.delta) == set(straight.delta)
    assert all(torch.equal(resumed.delta[k], straight.delta[k]) for k in straight.delta)
    assert resumed.metrics["resumed_from_step"] == 2 and resumed.metrics["steps"] == 4
    assert resumed.metrics["loss_first"] == straight.metrics["loss_first"]
    assert resumed.metrics["loss_last"] == straight.metrics["loss_last"]
    # A different global adapter, round or params must not silently reuse the checkpoint.
    with pytest.raises(RunStateError, match="different global adapter"):
        train_adapter(model, tokenizer, rt_dataset, params, _random_global_adapter(SUB_MAP, seed=9), SUB_MAP, PREFIX, "cpu", resume_state=state, round_num=5)
    with pytest.raises(RunStateError, match="round 5, not round 6"):
        train_adapter(model, tokenizer, rt_dataset, params, global_adapter, SUB_MAP, PREFIX, "cpu", resume_state=state, round_num=6)
    with pytest.raises(RunStateError, match="other TrainingParams"):
        train_adapter(model, tokenizer, rt_dataset, _params(local_steps=5), global_adapter, SUB_MAP, PREFIX, "cpu", resume_state=state, round_num=5)


def test_checkpoint_files_roundtrip_and_reject_corruption(tmp_path):
    state = TrainCheckpoint(
        round_num=1,
        step=3,
        params=params_dict(_params()),
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


def test_gradient_checkpointing_gives_the_same_result(fp32, rt_dataset):
    model, tokenizer = fp32
    params = _params(local_steps=2)
    plain = train_adapter(model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu")
    ckpt = train_adapter(model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu", gradient_checkpointing=True)
    for key, value in plain.delta.items():
        torch.testing.assert_close(ckpt.delta[key], value, atol=1e-6, rtol=1e-4)
    assert not model.is_activation_checkpointing


def test_refuses_a_model_that_already_has_an_adapter(fp32):
    model, _ = fp32
    peft_model = attach_lora(model, _params())
    try:
        with pytest.raises(ModelError, match="already carries"):
            attach_lora(peft_model, _params())
    finally:
        detach_lora(peft_model)
        for p in model.parameters():
            p.requires_grad_(True)


def test_nf4_lora_gradients_after_an_eval_pass_match_a_dequantized_reference(tiny_model_dir, rt_dataset):
    """No-grad eval first (the AVX512_BF16 trap), then train: LoRA gradients on NF4 must match
    an fp32 model holding the same dequantized weights, and so must a trainer step."""
    nf4 = _load_nf4(tiny_model_dir)
    ref = _dequantized_copy(nf4, tiny_model_dir)
    tokenizer = load_model(tiny_model_dir)[1]
    batch = make_batch(rt_dataset, tokenizer, [0, 1], 64)
    nf4.eval()
    with torch.no_grad():
        nf4(**batch)
    params = _params(local_steps=1, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])

    grads = []
    for model in (nf4, ref):
        peft_model = attach_lora(model, params)
        adapter = adapter_parameters(peft_model)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in adapter.values():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        peft_model.train()
        peft_model(**batch).loss.backward()
        grads.append({k: p.grad.clone() for k, p in adapter.items()})
        detach_lora(peft_model)
    assert set(grads[0]) == set(grads[1]) and len(grads[0]) == 32
    for key, expected in grads[1].items():
        assert expected.norm() > 0
        assert (grads[0][key] - expected).norm() <= 1e-4 * expected.norm(), key

    # The same through train_adapter, after another eval pass on the NF4 model.
    nf4.eval()
    with torch.no_grad():
        nf4(**batch)
    params = _params(local_steps=2, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    runs = [train_adapter(m, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu") for m in (nf4, ref)]
    assert runs[0].metrics["grad_norm_first"] == pytest.approx(runs[1].metrics["grad_norm_first"], rel=1e-4)
    assert runs[0].metrics["loss_last"] == pytest.approx(runs[1].metrics["loss_last"], rel=1e-4)
    for key, value in runs[1].delta.items():
        torch.testing.assert_close(runs[0].delta[key], value, atol=1e-5, rtol=1e-3)
    assert not _has_lora(nf4)


def test_nf4_weights_repacked_by_an_unprotected_eval_are_refused(tiny_model_dir, rt_dataset):
    """Without the workaround an eval pass repacks the weights (forced here with the flag, since
    this CPU may lack AVX512_BF16); training must then refuse instead of computing wrong grads."""
    import bitsandbytes as bnb

    nf4 = _load_nf4(tiny_model_dir)
    for module in nf4.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True
    tokenizer = load_model(tiny_model_dir)[1]
    nf4.eval()
    with torch.no_grad():
        nf4(**make_batch(rt_dataset, tokenizer, [0, 1], 64))
    with pytest.raises(ModelError, match="repacked for CPU inference"):
        train_adapter(nf4, tokenizer, rt_dataset, _params(local_steps=1), None, SUB_MAP, PREFIX, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_matches_cpu(fp32, rt_dataset, tiny_model_dir):
    model, tokenizer = fp32
    params = _params(local_steps=2)
    on_cpu = train_adapter(model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cpu")
    gpu_model, _ = load_model(tiny_model_dir)
    torch.backends.cuda.matmul.allow_tf32 = False
    on_gpu = train_adapter(gpu_model, tokenizer, rt_dataset, params, None, SUB_MAP, PREFIX, "cuda")
    assert next(gpu_model.parameters()).device.type == "cuda"
    for key, value in on_cpu.delta.items():
        assert on_gpu.delta[key].device.type == "cpu"
        torch.testing.assert_close(on_gpu.delta[key], value, atol=1e-4, rtol=1e-2)
    # 4-bit NF4 on CUDA trains too (no CPU repacking issue there).
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    nf4 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=quant, device_map="cuda")
    result = train_adapter(nf4, tokenizer, rt_dataset, _params(local_steps=3), None, SUB_MAP, PREFIX, "cuda")
    assert all(torch.isfinite(v).all() for v in result.delta.values()) and result.metrics["delta_norm"] > 0


def test_label_word_loss_is_cross_entropy_over_the_label_words_at_the_answer_position():
    from edge_client.trainer import label_word_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.full((2, 5), -100)
    labels[0, 3], labels[1, 2] = 7, 4  # answers start at positions 3 and 2
    word_ids = torch.tensor([4, 7])
    choices = torch.tensor([1, 0])
    expected = torch.nn.functional.cross_entropy(torch.stack([logits[0, 2, [4, 7]], logits[1, 1, [4, 7]]]), choices)
    assert torch.allclose(label_word_loss(logits, labels, choices, word_ids), expected)


def test_label_words_objective_learns_to_separate_the_labels(fp32, rt_dataset):
    """The objective trains the model's preference between the label words, which is what
    evaluation scores: the 2-way loss falls, and the delta differs from the answer objective's."""
    model, tokenizer = fp32
    losses = []
    params = _params(local_steps=8, objective="label_words")
    result = train_adapter(model, tokenizer, rt_dataset, params, None, [0, 1, 2, 3], PREFIX, "cpu",
                           progress_cb=lambda p: losses.append(p.loss))
    # A 2-way cross-entropy starts near ln 2 for an untuned model, far below the full-vocabulary loss.
    assert losses[0] < 3.0
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    answer = train_adapter(model, tokenizer, rt_dataset, _params(local_steps=8), None, [0, 1, 2, 3], PREFIX, "cpu")
    key = next(iter(result.delta))
    assert not torch.allclose(result.delta[key], answer.delta[key])


def test_label_words_objective_refuses_generation_data(fp32):
    model, tokenizer = fp32
    data = dataset_from_records([{"prompt": "2+2=", "answer": "4"}], source="gsm")
    with pytest.raises(DataError, match="label_words"):
        train_adapter(model, tokenizer, data, _params(objective="label_words"), None, [0, 1, 2, 3], PREFIX, "cpu")


def test_label_words_need_distinct_first_tokens(fp32):
    from shared.tasks import ClassificationTask

    _, tokenizer = fp32
    task = ClassificationTask.from_label_words({0: "not good", 1: "not bad"})
    with pytest.raises(DataError, match="distinct tokens"):
        task.first_answer_tokens(tokenizer)
    assert len(set(ClassificationTask.from_label_words().first_answer_tokens(tokenizer))) == 2
