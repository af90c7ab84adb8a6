"""Local datasets on the edge client: reading, validation, tokenization and batching.

A client's private data is a JSONL or CSV file in one of two formats, told apart by its
columns (extra columns are ignored):

* **classification**: ``text`` and ``label`` (an int, or a string such as ``"1"`` or the label
  word itself). A :class:`shared.tasks.ClassificationTask` supplies the label words and the
  prompt template, e.g. ``{"text": "a gripping film", "label": 1}`` trains the model to say
  ``" positive"`` after ``"Review: a gripping film\\nSentiment:"``.
* **generation**: ``prompt`` and ``answer``, used verbatim; an EOS token follows the answer.

Every problem is a :class:`shared.errors.DataError` naming the file and, for a bad row, its
line. Batches hold ``input_ids``, ``attention_mask`` and ``labels`` where ``labels`` is -100
everywhere except on the answer tokens, so the causal-LM loss covers only the answer.
Shuffling is a pure function of (seed, step): training resumes mid-round with the same batches.
"""

from __future__ import annotations

import csv
import functools
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import DataError
from shared.tasks import ClassificationTask, Example, TaskFormat, detect_format, encode_pair, read_jsonl_rows

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Label value for tokens that carry no loss (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)


@dataclass(frozen=True)
class LocalDataset:
    """A validated local dataset.

    Attributes:
        format: Classification or generation.
        examples: The examples, in file order.
        source: Where they came from (a path, or a description for in-memory records).
        task: The classification task used to build the examples (``None`` for generation).
    """

    format: TaskFormat
    examples: tuple[Example, ...]
    source: str
    task: ClassificationTask | None = None

    def __len__(self) -> int:
        return len(self.examples)


def load_dataset(
    path: str | Path, *, task: ClassificationTask | None = None, limit: int | None = None
) -> LocalDataset:
    """Read and validate a local JSONL or CSV dataset.

    Args:
        path: A ``.jsonl``/``.ndjson`` file (one JSON object per line, blank lines skipped) or
            a ``.csv`` file with a header row.
        task: Label words and prompt template for classification data (default: the
            negative/positive review task). Ignored for generation data.
        limit: Keep only the first ``limit`` examples.

    Returns:
        The dataset.

    Raises:
        DataError: The file is missing, unreadable, not UTF-8, of an unsupported type, empty,
            lacks the columns of either format, or has a bad row (the message names its line).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"dataset file {path} does not exist (pass a .jsonl or .csv file)")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        rows = read_jsonl_rows(path)
    elif suffix in CSV_SUFFIXES:
        rows = _read_csv(path)
    else:
        raise DataError(f"dataset file {path} has an unsupported type {suffix!r}: use .jsonl or .csv")
    return _build(rows, task=task, source=str(path), limit=limit)


def dataset_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    task: ClassificationTask | None = None,
    source: str = "records",
    limit: int | None = None,
) -> LocalDataset:
    """Build a dataset from in-memory rows (same formats and checks as :func:`load_dataset`).

    Args:
        records: Dicts with ``text``/``label`` or ``prompt``/``answer``.
        task: Classification task (default: negative/positive reviews).
        source: Name used in error messages.
        limit: Keep only the first ``limit`` examples.

    Returns:
        The dataset; row ``i`` is reported as line ``i + 1`` in errors.

    Raises:
        DataError: No rows, missing columns or a bad row.
    """
    return _build(((i + 1, dict(r)) for i, r in enumerate(records)), task=task, source=source, limit=limit)


def _read_csv(path: Path) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, restkey="\0extra", restval=None)
            if reader.fieldnames is None:
                raise DataError(f"{path}: the file is empty (a CSV dataset needs a header row and data rows)")
            width = len(reader.fieldnames)
            line = 1
            for row in reader:
                # A quoted field may span lines, so the row starts after the previous one ended.
                start, line = line + 1, reader.line_num
                if "\0extra" in row or any(v is None for v in row.values()):
                    got = width + len(row.get("\0extra", [])) - sum(v is None for v in row.values())
                    raise DataError(f"{path}:{start}: row has {got} fields but the header has {width}")
                if not any((v or "").strip() for v in row.values()):
                    continue
                rows.append((start, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except csv.Error as exc:
        raise DataError(f"{path}: malformed CSV ({exc})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc
    return rows


def _build(
    rows: Iterable[tuple[int, dict[str, Any]]],
    *,
    task: ClassificationTask | None,
    source: str,
    limit: int | None,
) -> LocalDataset:
    rows = list(rows)
    if not rows:
        raise DataError(f"{source}: holds no examples")
    fmt = detect_format(rows[0][1].keys(), source=f"{source}:{rows[0][0]}")
    task = task or ClassificationTask.from_label_words()
    examples = []
    for number, row in rows if limit is None else rows[:limit]:
        where = f"{source}:{number}"
        if fmt is TaskFormat.CLASSIFICATION:
            text = _text_field(row, "text", where)
            try:
                examples.append(task.example(text, _present(row, "label", where)))
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from exc
        else:
            prompt = _text_field(row, "prompt", where)
            answer = _text_field(row, "answer", where)
            examples.append(Example(prompt=prompt, answer=answer))
    return LocalDataset(
        format=fmt,
        examples=tuple(examples),
        source=source,
        task=task if fmt is TaskFormat.CLASSIFICATION else None,
    )


def _present(row: Mapping[str, Any], field: str, where: str) -> Any:
    if field not in row or row[field] is None:
        raise DataError(f"{where}: missing field {field!r}")
    value = row[field]
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def _text_field(row: Mapping[str, Any], field: str, where: str) -> str:
    value = _present(row, field, where)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class TokenizedExample:
    """One example as token ids.

    Attributes:
        input_ids: Prompt then answer token ids.
        labels: Same length; :data:`IGNORE_INDEX` on prompt tokens, the token id on answer tokens.
    """

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def tokenize_example(tokenizer: Any, example: Example, seq_len: int, *, add_eos: bool) -> TokenizedExample:
    """Tokenize one example for causal-LM training on its answer.

    Args:
        tokenizer: A Hugging Face tokenizer.
        example: The example.
        seq_len: Maximum length; the prompt is cut from its left so the answer survives.
        add_eos: Append EOS to the answer (generation data).

    Returns:
        The tokenized example (length <= ``seq_len``).

    Raises:
        DataError: ``seq_len`` < 2, or the prompt or answer tokenizes to nothing.
    """
    ids, n_answer = encode_pair(tokenizer, example.prompt, example.answer, seq_len, add_eos=add_eos)
    labels = [IGNORE_INDEX] * (len(ids) - n_answer) + ids[len(ids) - n_answer :]
    return TokenizedExample(input_ids=tuple(ids), labels=tuple(labels))


def collate(examples: Sequence[TokenizedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into one batch (to the longest example, not to seq_len).

    Args:
        examples: B tokenized examples.
        pad_token_id: Id written into padding (it is masked, so any valid id works).

    Returns:
        ``input_ids`` and ``labels`` (int64 ``[B, T]``, labels -100 on padding) and
        ``attention_mask`` (int64 ``[B, T]``, 1 on real tokens).
    """
    import torch

    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[b, :n] = torch.tensor(e.input_ids)
        labels[b, :n] = torch.tensor(e.labels)
        mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@functools.lru_cache(maxsize=8)
def _permutation(n: int, seed: str, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    # str seeds hash through SHA-512 in random.Random: stable across runs and platforms.
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return tuple(order)


def batch_indices(n: int, batch_size: int, seed: int | str, step: int) -> list[int]:
    """Example indices of one batch in a deterministic shuffled stream.

    The stream is epoch after epoch of the examples, each epoch a fresh permutation drawn
    from ``(seed, epoch)``; batch ``step`` is items ``step * batch_size`` onward. It depends
    on nothing but its arguments, so a resumed run sees the same batches.

    Args:
        n: Number of examples (>= 1).
        batch_size: Examples per batch (>= 1).
        seed: Shuffle seed.
        step: Batch number (>= 0).

    Returns:
        ``batch_size`` indices in ``[0, n)`` (repeats only across epochs).

    Raises:
        DataError: ``n`` or ``batch_size`` < 1, or ``step`` < 0.
    """
    if n < 1 or batch_size < 1 or step < 0:
        raise DataError(f"cannot draw batch {step} of size {batch_size} from {n} examples")
    out = []
    for position in range(step * batch_size, (step + 1) * batch_size):
        epoch, offset = divmod(position, n)
        out.append(_permutation(n, str(seed), epoch)[offset])
    return out


def make_batch(
    dataset: LocalDataset, tokenizer: Any, indices: Sequence[int], seq_len: int
) -> dict[str, torch.Tensor]:
    """Tokenize and collate the examples at ``indices``.

    Args:
        dataset: The dataset.
        tokenizer: A Hugging Face tokenizer (its pad id, else EOS id, else 0 pads).
        indices: Example indices.
        seq_len: Maximum sequence length.

    Returns:
        A batch as in :func:`collate`.
    """
    add_eos = dataset.format is TaskFormat.GENERATION
    examples = [tokenize_example(tokenizer, dataset.examples[i], seq_len, add_eos=add_eos) for i in indices]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(examples, pad if pad is not None else 0)
