"""Local QLoRA training (edge_client.trainer) on a real 4-layer cut of SmolLM2 and real
Rotten Tomatoes sentences. Each test takes a handful of steps at batch 2, seq 64.

The CUDA test skips itself without a GPU.
"""

from __future__ import annotations

import pytest
import torch

from coordinator.model.models import load_model
from edge_client.data import dataset_from_records
from edge_client.trainer import TrainOptions, first_answer_tokens, label_word_loss, train_adapter
from shared.errors import DataError
from shared.tasks import TaskSpec
from tests.edge_client.helpers import PREFIX, SUB_MAP, TARGETS, has_lora, make_params


def test_loss_decreases_on_rotten_tomatoes_and_model_is_restored(fp32, rt_dataset):
    model, tokenizer = fp32
    flags = [p.requires_grad for p in model.parameters()]
    losses = []
    params = make_params(local_steps=8)
    result = train_adapter(model, tokenizer, rt_dataset, params, None, [0, 1, 2, 3], PREFIX, "cpu", options=TrainOptions(progress_cb=lambda p: losses.append(p.loss)))
    assert len(losses) == 8 and result.metrics["steps"] == 8
    assert result.metrics["loss_first"] == losses[0] and result.metrics["loss_last"] == losses[-1]
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
    assert result.num_examples == len(rt_dataset) == 64
    assert result.metrics["answer_tokens"] == 16  # one label-word token per example, 8 steps x 2
    # The base model comes back bare: no LoRA modules, same mode, same requires_grad flags.
    assert not has_lora(model) and not model.training
    assert [p.requires_grad for p in model.parameters()] == flags


def test_proximal_term_keeps_the_delta_near_the_global_adapter(fp32, rt_dataset):
    model, tokenizer = fp32
    free = train_adapter(model, tokenizer, rt_dataset, make_params(local_steps=4, mu=0.0), None, SUB_MAP, PREFIX, "cpu")
    tied = train_adapter(model, tokenizer, rt_dataset, make_params(local_steps=4, mu=1e4), None, SUB_MAP, PREFIX, "cpu")
    assert tied.metrics["delta_norm"] < 0.3 * free.metrics["delta_norm"], (tied.metrics, free.metrics)
    assert free.metrics["delta_norm"] > 0


def test_delta_has_canonical_full_llm_keys(fp32, rt_dataset):
    model, tokenizer = fp32
    result = train_adapter(model, tokenizer, rt_dataset, make_params(local_steps=1), None, SUB_MAP, PREFIX, "cpu")
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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_training_matches_cpu(fp32, rt_dataset, tiny_model_dir):
    model, tokenizer = fp32
    params = make_params(local_steps=2)
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
    result = train_adapter(nf4, tokenizer, rt_dataset, make_params(local_steps=3), None, SUB_MAP, PREFIX, "cuda")
    assert all(torch.isfinite(v).all() for v in result.delta.values()) and result.metrics["delta_norm"] > 0


def test_label_word_loss_is_cross_entropy_over_the_label_words_at_the_answer_position():
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
    params = make_params(local_steps=8, objective="label_words")
    result = train_adapter(model, tokenizer, rt_dataset, params, None, [0, 1, 2, 3], PREFIX, "cpu", options=TrainOptions(progress_cb=lambda p: losses.append(p.loss)))
    # A 2-way cross-entropy starts near ln 2 for an untuned model, far below the full-vocabulary loss.
    assert losses[0] < 3.0
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    answer = train_adapter(model, tokenizer, rt_dataset, make_params(local_steps=8), None, [0, 1, 2, 3], PREFIX, "cpu")
    key = next(iter(result.delta))
    assert not torch.allclose(result.delta[key], answer.delta[key])


def test_label_words_objective_refuses_generation_data(fp32):
    model, tokenizer = fp32
    data = dataset_from_records([{"prompt": "2+2=", "answer": "4"}], TaskSpec.for_kind("generation"), source="gsm")
    with pytest.raises(DataError, match="label_words"):
        train_adapter(model, tokenizer, data, make_params(objective="label_words"), None, [0, 1, 2, 3], PREFIX, "cpu")


def test_label_words_need_distinct_first_tokens(fp32):
    _, tokenizer = fp32
    task = TaskSpec(label_words={"0": "not good", "1": "not bad"})
    with pytest.raises(DataError, match="distinct tokens"):
        first_answer_tokens(tokenizer, task.classification_choices())
    assert len(set(first_answer_tokens(tokenizer, TaskSpec().classification_choices()))) == 2


def test_label_words_objective_trains_multiple_choice_over_the_option_letters(fp32):
    model, tokenizer = fp32
    task = TaskSpec.for_kind("multiple_choice")
    rows = [{"question": f"Which is number {i}?", "options": ["one", "two", "three"], "answer": i % 3} for i in range(6)]
    data = dataset_from_records(rows, task, source="mcq")
    assert data.choices == (" A", " B", " C")
    result = train_adapter(model, tokenizer, data, make_params(objective="label_words", local_steps=2), None, [0, 1, 2, 3], PREFIX, "cpu")
    assert result.metrics["steps"] == 2


@pytest.mark.parametrize("preset", ["medmcqa", "gsm_symbolic"])
def test_loss_decreases_on_multiple_choice_and_generation_tasks(fp32, preset):
    from coordinator.model.datasets import gsm_symbolic_rows, medmcqa_rows
    from coordinator.model.presets import task_preset

    model, tokenizer = fp32
    rows = medmcqa_rows()[:8] if preset == "medmcqa" else gsm_symbolic_rows(8, seed=0)
    data = dataset_from_records(rows, task_preset(preset), source=preset)
    losses = []
    params = make_params(local_steps=10, seq_len=128)
    train_adapter(model, tokenizer, data, params, None, [0, 1, 2, 3], PREFIX, "cpu", options=TrainOptions(progress_cb=lambda p: losses.append(p.loss)))
    assert sum(losses[-3:]) / 3 < 0.9 * sum(losses[:3]) / 3, losses
