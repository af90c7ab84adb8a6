"""Scoring a model on each kind of task (coordinator.model.task_eval), on the 4-layer SmolLM2 cut.

A cut model is a poor test-taker: these tests check that each kind is judged the way its
metric says, with an interval around the value and one score per example, not how well it does.
"""

from __future__ import annotations

import pytest

from coordinator.model.datasets import gsm_symbolic_rows, medmcqa_rows, movie_reviews
from coordinator.model.presets import task_preset
from coordinator.model.task_eval import EvalSettings, compare, score_task
from shared.errors import DataError
from shared.scoring import pick_choices
from shared.tasks import TaskSpec

SETTINGS = EvalSettings(max_length=256, batch_size=4)


def test_classification_is_the_most_likely_label_with_accuracy_and_macro_f1(smol):
    model, tokenizer = smol
    task = task_preset("rotten_tomatoes")
    rows = movie_reviews("rotten_tomatoes")
    examples = [task.example(r) for r in rows[:5] + rows[-5:]]
    score = score_task(model, tokenizer, task, examples, SETTINGS)
    direct = pick_choices(model, tokenizer, [e.prompt for e in examples], list(task.classification_choices()), max_length=256)
    assert score.predictions == [str(p) for p in direct]
    assert score.per_example == [float(p == e.label) for p, e in zip(direct, examples)]
    assert score.value.name == "accuracy" and score.value.value == sum(score.per_example) / 10 and score.value.n == 10
    assert score.value.low <= score.value.value <= score.value.high
    assert set(score.extra) == {"macro_f1"}
    as_f1 = score_task(model, tokenizer, TaskSpec(metric="macro_f1"), examples, SETTINGS)
    assert as_f1.value.name == "macro_f1" and as_f1.value == score.extra["macro_f1"] and "accuracy" in as_f1.extra


def test_multiple_choice_picks_one_of_each_questions_letters(smol):
    model, tokenizer = smol
    task = task_preset("medmcqa")
    examples = [task.example(r) for r in medmcqa_rows()[:6]]
    score = score_task(model, tokenizer, task, examples, SETTINGS)
    assert all(0 <= int(p) < 4 for p in score.predictions) and len(score.per_example) == 6
    assert score.value.value == sum(float(int(p) == e.label) for p, e in zip(score.predictions, examples)) / 6


@pytest.mark.parametrize("metric", ["exact_match", "rougeL"])
def test_generation_decodes_and_compares_with_the_reference(smol, metric):
    model, tokenizer = smol
    task = TaskSpec(**{**task_preset("gsm_symbolic").__dict__, "metric": metric, "max_new_tokens": 6})
    examples = [task.example(r) for r in gsm_symbolic_rows(3, seed=0)]
    score = score_task(model, tokenizer, task, examples, SETTINGS)
    assert len(score.predictions) == 3 and all(isinstance(p, str) for p in score.predictions)
    assert len(tokenizer(score.predictions[0], add_special_tokens=False)["input_ids"]) <= 6
    assert all(0.0 <= s <= 1.0 for s in score.per_example) and score.value.name == metric
    # The same model compared with itself: no difference, an interval around zero.
    same = compare(score, score)
    assert same.value == 0.0 and same.low <= 0.0 <= same.high


def test_no_examples_is_a_data_error(smol):
    model, tokenizer = smol
    with pytest.raises(DataError, match="at least one test example"):
        score_task(model, tokenizer, task_preset("imdb"), [], SETTINGS)
