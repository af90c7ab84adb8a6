"""The task definition (shared.tasks.TaskSpec): each kind formats its rows, refuses the rows
that do not fit with the field and line, and refuses templates that could do harm."""

from __future__ import annotations

import pytest

from shared.errors import ConfigError, DataError
from shared.tasks import KINDS, Example, TaskSpec

REVIEWS = TaskSpec()
MCQ = TaskSpec.for_kind("multiple_choice", prompt_template="Subject: {subject}\nQuestion: {question}\n{options}\nAnswer:")
GSM = TaskSpec.for_kind("generation", prompt_template="Question: {question}\nAnswer:", metric="exact_match", normalizer="last_number")


def test_classification_rows_become_label_word_answers():
    example = REVIEWS.example({"text": "a fine film", "label": 1})
    assert example == Example("Review: a fine film\nSentiment:", " positive", 1, (" negative", " positive"), "1")
    assert REVIEWS.example({"text": "dull", "label": "negative"}).label == 0  # the word itself
    multi = TaskSpec(label_words={"0": "not good", "1": "very good"})  # multi-token words are answers too
    assert multi.example({"text": "x", "label": "1"}).answer == " very good"
    assert REVIEWS.metric == "accuracy" and TaskSpec(metric="macro_f1").metric == "macro_f1"


def test_multiple_choice_rows_render_lettered_options_and_accept_every_answer_form():
    row = {"subject": "Anatomy", "question": "Which?", "options": ["Hyperplasia", "Atrophy", "Dysplasia"], "answer": "b"}
    example = MCQ.example(row)
    assert example.prompt == "Subject: Anatomy\nQuestion: Which?\nA) Hyperplasia\nB) Atrophy\nC) Dysplasia\nAnswer:"
    assert example.answer == " B" and example.label == 1 and example.choices == (" A", " B", " C")
    for answer in ("B", "b) Atrophy", 1, "atrophy", "B."):
        assert MCQ.example({**row, "answer": answer}).label == 1, answer
    csv_row = {**row, "options": "Hyperplasia | Atrophy | Dysplasia"}  # a CSV cell
    assert MCQ.example(csv_row).prompt == example.prompt


def test_generation_rows_keep_the_answer_as_written():
    example = GSM.example({"question": "2 + 2?", "answer": 4})
    assert example == Example("Question: 2 + 2?\nAnswer:", " 4", reference="4")
    assert GSM.label_of({"question": "q", "answer": "1"}) is None
    assert MCQ.label_of({"subject": "s", "question": "q", "options": ["x", "y"], "answer": "B"}) == 1


@pytest.mark.parametrize(
    ("task", "row", "message"),
    [
        (REVIEWS, {"label": 1}, r"data\.jsonl:7: missing field 'text'"),
        (REVIEWS, {"text": "x", "label": 9}, r"data\.jsonl:7: label 9 is not one of the task's labels: 0 \(negative\), 1 \(positive\)"),
        (MCQ, {"subject": "s", "question": "q", "options": ["only one"], "answer": "A"}, "list of 2 to 26 options"),
        (MCQ, {"subject": "s", "question": "q", "options": ["x", "y"], "answer": "E"}, r"answer 'E' names none of the 2 options"),
        (MCQ, {"subject": "s", "question": "q", "options": ["x", ""], "answer": "A"}, "has an empty option"),
        (GSM, {"question": "q"}, "missing field 'answer'"),
        (GSM, {"question": {"nested": 1}, "answer": "1"}, "must be text"),
    ],
)
def test_a_row_that_does_not_fit_is_refused_with_its_place(task, row, message):
    with pytest.raises(DataError, match=message):
        task.example(row, "data.jsonl:7")


def test_many_rows_fail_at_the_first_bad_one_by_line():
    rows = [(1, {"text": "ok", "label": 0}), (4, {"text": "bad", "label": "maybe"})]
    with pytest.raises(DataError, match=r"^client\.csv:4: label 'maybe'"):
        REVIEWS.examples(rows, "client.csv")
    with pytest.raises(DataError, match="holds no examples"):
        REVIEWS.examples([], "client.csv")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"kind": "ranking"}, "task.kind must be one of"),
        ({"metric": "rougeL"}, "does not judge a classification task"),
        ({"label_words": {"0": "same", "1": "same"}}, "distinct"),
        ({"label_words": {"0": "only"}}, "at least two"),
        ({"target_template": " {label}"}, "must contain {answer}"),
        ({"prompt_template": "{text.__class__}"}, "plain {field} names"),
        ({"prompt_template": "{text:>999999999}"}, "plain {field} names"),
        ({"prompt_template": "{text!r}"}, "plain {field} names"),
        ({"prompt_template": "{0}"}, "plain {field} names"),
        ({"prompt_template": "x" * 5000 + "{text}"}, "longer than 4096"),
        ({"prompt_template": "unbalanced {text"}, "not a valid template"),
        ({"normalizer": "stem"}, "task.normalizer"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ],
)
def test_a_task_that_could_not_work_or_could_do_harm_is_refused(changes, message):
    with pytest.raises(ConfigError, match=message):
        TaskSpec(**changes)


def test_kind_defaults_and_plain_text_prompts():
    assert set(KINDS) == {"classification", "multiple_choice", "generation"}
    assert TaskSpec.for_kind("generation").row_fields() == ("prompt", "answer")
    assert MCQ.row_fields() == ("subject", "question", "options", "answer")
    with pytest.raises(ConfigError, match="needs {options}"):
        TaskSpec.for_kind("multiple_choice", prompt_template="{question}")
    assert REVIEWS.fill_prompt("some public text") == "Review: some public text\nSentiment:"
    with pytest.raises(ConfigError, match="one field only"):
        MCQ.fill_prompt("text")
