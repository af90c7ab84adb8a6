"""Local datasets on the edge client: reading, formatting with the run's task, batching.

A client's private data is a JSONL or CSV file (:mod:`shared.rows`). The client reads it
when it starts (:func:`load_rows`: a missing or unreadable file, or a line that is not a row,
fails at once), says in its hello how many rows it holds, and formats them with the task the
coordinator publishes in its schedule (:func:`build_dataset`, :class:`shared.tasks.TaskSpec`):
a row that does not fit the task (a missing field, an unknown label) is refused with its file
and line before any training. Classification rows such as ``{"text": "a gripping film",
"label": 1}`` train the model to say ``" positive"`` after ``"Review: a gripping film\nSentiment:"``.

Batches hold ``input_ids``, ``attention_mask`` and ``labels`` where ``labels`` is -100
everywhere except on the answer tokens, so the causal-LM loss covers only the answer.
Shuffling is a pure function of (seed, step): training resumes mid-round with the same batches.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import DataError
from shared.rows import Row, read_rows
from shared.scoring import encode_pair
from shared.tasks import Example, TaskSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Label value for tokens that carry no loss (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


@dataclass(frozen=True)
class LocalRows:
    """A client's data file as read at start, before the run's task formats it.

    Attributes:
        rows: ``(line, row)`` pairs in file order.
        source: Where they came from (the path, or a description for in-memory rows).
    """

    rows: tuple[Row, ...]
    source: str

    def __len__(self) -> int:
        return len(self.rows)


@dataclass(frozen=True)
class LocalDataset:
    """A local dataset formatted with the run's task.

    Attributes:
        task: The task that formatted it.
        examples: The examples, in file order.
        source: Where they came from.
        choices: The candidate answers every example shares (classification; multiple choice
            when every question has as many options), else None: what the ``label_words``
            training objective chooses among.
    """

    task: TaskSpec
    examples: tuple[Example, ...]
    source: str
    choices: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.examples)


def load_rows(path: str | Path) -> LocalRows:
    """Read a local JSONL or CSV data file (see :func:`shared.rows.read_rows`).

    Raises:
        DataError: The file is missing, unreadable, not UTF-8, of an unsupported type, empty,
            or has a line that is not a row (named by its line).
    """
    return LocalRows(tuple(read_rows(path)), str(path))


def rows_from_records(records: Iterable[Mapping[str, Any]], source: str = "records") -> LocalRows:
    """In-memory rows (record ``i`` is reported as line ``i + 1`` in errors)."""
    return LocalRows(tuple((i + 1, dict(r)) for i, r in enumerate(records)), source)


def build_dataset(rows: LocalRows, task: TaskSpec, *, limit: int | None = None) -> LocalDataset:
    """Format every row with the run's task.

    Args:
        rows: What :func:`load_rows` read.
        task: The task of the coordinator's schedule.
        limit: Keep only the first ``limit`` rows.

    Returns:
        The dataset.

    Raises:
        DataError: No rows, or a row that does not fit the task (the message names its file
            and line).
    """
    chosen = rows.rows if limit is None else rows.rows[:limit]
    examples = tuple(task.examples(chosen, rows.source))
    shared = {e.choices for e in examples}
    choices = next(iter(shared)) if len(shared) == 1 and examples[0].choices else None
    return LocalDataset(task=task, examples=examples, source=rows.source, choices=choices)


def dataset_from_records(
    records: Iterable[Mapping[str, Any]], task: TaskSpec, *, source: str = "records", limit: int | None = None
) -> LocalDataset:
    """Build a dataset from in-memory rows (the same checks as a file's).

    Raises:
        DataError: No rows, or a row that does not fit the task.
    """
    return build_dataset(rows_from_records(records, source), task, limit=limit)


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


# Batches are padded to a multiple of this many tokens (never past seq_len). CPU kernels
# (oneDNN) build and keep a primitive, with its scratch memory, per tensor shape; padding to
# the longest example gives nearly every batch a new width, so a client's memory grew round
# after round (measured, bundled SmolLM2 L10-bf16: peak 956 -> 1083 MiB over 4 rounds, which
# ran a client over its cap in round 2). With widths in steps of 32 the peak stays flat (847 ->
# 853 MiB), at the same speed; the padding is masked, so the loss is unchanged.
PAD_WIDTH_MULTIPLE = 32


def collate(
    examples: Sequence[TokenizedExample], pad_token_id: int, *, width_multiple: int = 1, max_width: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad tokenized examples into one batch: to the longest example, rounded up to a
    multiple of ``width_multiple`` but not past ``max_width`` (never below the longest).

    Args:
        examples: B tokenized examples.
        pad_token_id: Id written into padding (it is masked, so any valid id works).
        width_multiple: Round the batch width up to a multiple of this (1 = the longest example).
        max_width: Do not round up past this width (the run's seq_len).

    Returns:
        ``input_ids`` and ``labels`` (int64 ``[B, T]``, labels -100 on padding) and
        ``attention_mask`` (int64 ``[B, T]``, 1 on real tokens).
    """
    import torch

    longest = max(len(e.input_ids) for e in examples)
    width = -(-longest // width_multiple) * width_multiple
    if max_width is not None:
        width = max(longest, min(width, max_width))
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
        A batch as in :func:`collate`, its width a multiple of :data:`PAD_WIDTH_MULTIPLE`
        (or ``seq_len``).
    """
    # A generated answer must learn where to stop; a label word or letter is scored, not decoded.
    add_eos = dataset.task.kind == "generation"
    examples = [tokenize_example(tokenizer, dataset.examples[i], seq_len, add_eos=add_eos) for i in indices]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(examples, pad if pad is not None else 0, width_multiple=PAD_WIDTH_MULTIPLE, max_width=seq_len)
