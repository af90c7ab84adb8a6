"""Judging a model on the run's task: the metric, with a confidence interval, per example.

* classification: the label whose answer the model finds most likely after the prompt
  (:func:`shared.scoring.pick_choices`), ``accuracy`` or ``macro_f1``;
* multiple choice: the same over each question's option letters (questions grouped by how
  many options they have), ``accuracy``;
* generation: greedy decoding of up to ``max_new_tokens`` (:mod:`coordinator.model.generate`),
  then ``exact_match`` after the task's normalizer, or ``rougeL``.

Every evaluation keeps its per-example scores, so two evaluations of the same examples
(the full model before and after the adapter) compare as a paired difference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.model.generate import greedy_generate
from coordinator.model.metrics import (
    MetricValue,
    accuracy_scores,
    bootstrap_interval,
    exact_match,
    macro_f1,
    paired_difference,
    rouge_l_scores,
    summarize,
)
from shared.errors import DataError
from shared.scoring import pick_choices
from shared.tasks import Example, TaskSpec


@dataclass(frozen=True)
class EvalSettings:
    """How to run an evaluation.

    Attributes:
        max_length: Tokens per scored prompt (longer prompts lose tokens on the left).
        batch_size: Prompts per forward pass / decoding batch.
        confidence: Level of the confidence intervals.
    """

    max_length: int = 512
    batch_size: int = 8
    confidence: float = 0.95


@dataclass(frozen=True)
class TaskScore:
    """One model's score on a set of examples.

    Attributes:
        value: The task's metric with its confidence interval.
        per_example: Each example's score (1/0 for accuracy and exact match, the ROUGE-L F
            for rougeL; for macro_f1, whether the example was right).
        predictions: What the model answered: the chosen label / option index as text, or the
            generated text.
        extra: Other metrics of the same predictions (classification: accuracy beside macro-F1).
        statistic: For a metric that is not a mean over examples (macro-F1): the metric on a
            subset of example indices, which paired comparisons resample.
    """

    value: MetricValue
    per_example: list[float]
    predictions: list[str]
    extra: dict[str, MetricValue]
    statistic: Callable[[Sequence[int]], float] | None = field(default=None, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain types for the reports (the per-example scores are left out)."""
        return {**self.value.to_dict(), "extra": {k: v.to_dict() for k, v in self.extra.items()}}


def score_task(model: Any, tokenizer: Any, task: TaskSpec, examples: Sequence[Example], settings: EvalSettings = EvalSettings()) -> TaskScore:
    """Score a model on examples of ``task`` (see the module docstring).

    Args:
        model: A causal LM (plain, 4-bit or PEFT-wrapped).
        tokenizer: Its tokenizer.
        task: The task.
        examples: Test examples built by the task.
        settings: Lengths, batching and confidence.

    Returns:
        The score.

    Raises:
        DataError: No examples.
    """
    if not examples:
        raise DataError("an evaluation needs at least one test example")
    if task.kind == "generation":
        return _score_generation(model, tokenizer, task, examples, settings)
    predicted = _pick(model, tokenizer, examples, settings)
    gold = [int(e.label) for e in examples]  # type: ignore[arg-type]  # classification and MC rows have one
    correct = accuracy_scores(predicted, gold)
    accuracy = summarize("accuracy", correct, binary=True, confidence=settings.confidence)
    if task.kind == "classification":
        classes = len(task.label_words)

        def f1_of(indices: Sequence[int]) -> float:
            return macro_f1([predicted[i] for i in indices], [gold[i] for i in indices], classes)

        low, high = bootstrap_interval(correct, f1_of, confidence=settings.confidence)
        f1 = MetricValue("macro_f1", f1_of(range(len(gold))), low, high, len(gold), "bootstrap")
        if task.metric == "macro_f1":
            return TaskScore(f1, correct, [str(p) for p in predicted], {"accuracy": accuracy}, f1_of)
        return TaskScore(accuracy, correct, [str(p) for p in predicted], {"macro_f1": f1})
    return TaskScore(accuracy, correct, [str(p) for p in predicted], {})


def _pick(model: Any, tokenizer: Any, examples: Sequence[Example], settings: EvalSettings) -> list[int]:
    # Questions with the same candidates are scored together (every classification example;
    # multiple-choice questions with as many options).
    predicted = [0] * len(examples)
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, example in enumerate(examples):
        groups.setdefault(example.choices, []).append(i)
    for choices, index in groups.items():
        picks = pick_choices(
            model, tokenizer, [examples[i].prompt for i in index], list(choices),
            batch_size=settings.batch_size, max_length=settings.max_length,
        )
        for i, pick in zip(index, picks):
            predicted[i] = pick
    return predicted


def _score_generation(model: Any, tokenizer: Any, task: TaskSpec, examples: Sequence[Example], settings: EvalSettings) -> TaskScore:
    outputs = greedy_generate(
        model, tokenizer, [e.prompt for e in examples], max_new_tokens=task.max_new_tokens,
        batch_size=settings.batch_size, max_prompt_tokens=settings.max_length, chat_template=task.chat_template,
    )
    references = [e.reference for e in examples]
    if task.metric == "rougeL":
        scores = rouge_l_scores(outputs, references)
        value = summarize("rougeL", scores, binary=False, confidence=settings.confidence)
    else:
        scores = exact_match(outputs, references, task.normalizer)
        value = summarize("exact_match", scores, binary=True, confidence=settings.confidence)
    return TaskScore(value, scores, list(outputs), {})


def compare(after: TaskScore, before: TaskScore, confidence: float = 0.95) -> MetricValue:
    """``after - before`` on the same examples, with a paired bootstrap interval (the same
    resampled examples for both; for macro-F1, the difference of the two F1s per resample)."""
    if after.statistic is None or before.statistic is None:
        return paired_difference(after.per_example, before.per_example, confidence=confidence)
    a, b = after.statistic, before.statistic
    low, high = bootstrap_interval(after.per_example, lambda idx: a(idx) - b(idx), confidence=confidence)
    return MetricValue("difference", after.value.value - before.value.value, low, high, after.value.n, "paired_bootstrap")
