"""Calibration text: public paragraphs and task-format prompts built from public reviews."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import AutoTokenizer

from coordinator.model.datasets import movie_reviews, task_prompts
from coordinator.model.pipeline import ModelPipeline
from coordinator.settings import RunConfig
from shared.errors import DataError
from shared.tasks import ClassificationTask


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_task_prompts_wrap_public_reviews_in_the_template_and_keep_its_end(tokenizer):
    task = ClassificationTask.from_label_words()
    prompts = task_prompts("imdb", task, tokenizer, 5, max_tokens=40)
    assert len(prompts) == 5
    for prompt, row in zip(prompts, movie_reviews("imdb")[-5:]):
        assert prompt.startswith("Review: ") and prompt.endswith("\nSentiment:")
        assert len(tokenizer(prompt)["input_ids"]) <= 40
        # Long reviews keep their last words: the verdict sits at the end.
        assert row["text"].strip().endswith(prompt[len("Review: "):-len("\nSentiment:")].strip()[-20:])


def test_task_prompts_from_an_unknown_source_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="neither a file"):
        task_prompts(str(tmp_path / "missing.jsonl"), ClassificationTask.from_label_words(), tokenizer, 3, 40)


def test_calibration_mixes_task_prompts_into_public_text(tiny_model_dir, tmp_path):
    base = RunConfig()
    config = dataclasses.replace(base, model=dataclasses.replace(
        base.model, model=str(tiny_model_dir), calibration_samples=6, calibration_seq_len=48,
        task_calibration="imdb", task_calibration_samples=6))
    pipeline = ModelPipeline(config, tmp_path, lambda _message: None)
    batches = pipeline.calibration_batches()
    rows = [row for batch in batches for row in batch["input_ids"]]
    assert len(rows) == 12
    sentiment = pipeline.tokenizer("\nSentiment:", add_special_tokens=False)["input_ids"]
    with_template = [r for r in rows if _ends_with(r.tolist(), sentiment, pipeline.tokenizer.pad_token_id)]
    assert len(with_template) == 6
    # Mixed, not appended: the task prompts are not all in the last batches.
    assert any(_ends_with(r.tolist(), sentiment, pipeline.tokenizer.pad_token_id) for r in rows[:6])


def _ends_with(ids: list[int], tail: list[int], pad: int | None) -> bool:
    while ids and ids[-1] == pad:
        ids = ids[:-1]
    return ids[-len(tail):] == tail
