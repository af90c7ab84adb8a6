"""Task formats shared by the edge client (training) and the coordinator (evaluation).

Two kinds of local example exist:

* **classification** rows carry ``text`` and ``label``. A :class:`ClassificationTask` turns
  them into a prompt (``"Review: {text}\\nSentiment:"`` by default) and a short answer, the
  label's word with a leading space (``" positive"``). Training is causal-LM loss on that
  answer; evaluation asks which label word the model finds most likely after the prompt
  (:func:`score_label_words`), so no generation or parsing is involved.
* **generation** rows carry ``prompt`` and ``answer`` verbatim.

Both sides tokenize a (prompt, answer) pair with :func:`encode_pair`, so the token boundary the
client trains on is exactly the one the coordinator scores. This module must not import
``coordinator`` or ``edge_client``; torch is imported lazily so it stays cheap to import.
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = "Review: {text}\nSentiment:"
DEFAULT_TARGET_TEMPLATE = " {label_word}"
DEFAULT_LABEL_WORDS: Mapping[int, str] = {0: "negative", 1: "positive"}

#: Columns that identify each format (extra columns are allowed and ignored).
CLASSIFICATION_COLUMNS = ("text", "label")
GENERATION_COLUMNS = ("prompt", "answer")


class TaskFormat(str, enum.Enum):
    """The two local dataset formats."""

    CLASSIFICATION = "classification"
    GENERATION = "generation"


def detect_format(columns: Iterable[str], *, source: str = "dataset") -> TaskFormat:
    """Decide a dataset's format from its column names.

    Args:
        columns: Column (CSV header) or field (JSONL keys) names.
        source: Where the columns came from, for the error message.

    Returns:
        :attr:`TaskFormat.GENERATION` when ``prompt`` and ``answer`` are present,
        :attr:`TaskFormat.CLASSIFICATION` when ``text`` and ``label`` are.

    Raises:
        DataError: Neither or both column sets are present.
    """
    names = set(columns)
    is_gen = all(c in names for c in GENERATION_COLUMNS)
    is_cls = all(c in names for c in CLASSIFICATION_COLUMNS)
    if is_gen and is_cls:
        raise DataError(
            f"{source}: has both 'prompt'/'answer' and 'text'/'label' columns, so its format is "
            "ambiguous; keep only the pair you mean"
        )
    if is_gen:
        return TaskFormat.GENERATION
    if is_cls:
        return TaskFormat.CLASSIFICATION
    found = ", ".join(sorted(names)) or "none"
    raise DataError(
        f"{source}: missing columns: a classification dataset needs 'text' and 'label', a "
        f"generation dataset needs 'prompt' and 'answer' (found: {found})"
    )


@dataclass(frozen=True)
class Example:
    """One training or evaluation example, already in prompt/answer form.

    Attributes:
        prompt: Text the model conditions on.
        answer: Text the model learns to produce after the prompt (loss is on these tokens).
        label: For classification, the index of the label in the task's label list;
            ``None`` for generation examples.
    """

    prompt: str
    answer: str
    label: int | None = None


@dataclass(frozen=True)
class ClassificationTask:
    """How classification rows become prompts and answers.

    Build one with :meth:`from_label_words`. Labels are matched by their string form, so the
    CSV value ``"1"`` and the JSON value ``1`` both mean label ``1``; a row may also give the
    label word itself (``"positive"``).

    Attributes:
        labels: Label keys as strings, in a fixed order (the order of predictions).
        words: The label word for each key (same order as ``labels``).
        prompt_template: ``str.format`` template with a ``{text}`` field.
        target_template: ``str.format`` template with a ``{label_word}`` field.
    """

    labels: tuple[str, ...]
    words: tuple[str, ...]
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    target_template: str = DEFAULT_TARGET_TEMPLATE

    def __post_init__(self) -> None:
        if not self.labels or len(self.labels) != len(self.words):
            raise ConfigError("a classification task needs one word per label and at least one label")
        if len(set(self.labels)) != len(self.labels) or len(set(self.words)) != len(self.words):
            raise ConfigError(f"label keys and label words must be unique, got {dict(zip(self.labels, self.words))}")
        if any(not w.strip() for w in self.words):
            raise ConfigError("label words must be non-empty")
        _check_template(self.prompt_template, "text", "prompt template")
        _check_template(self.target_template, "label_word", "target template")

    @classmethod
    def from_label_words(
        cls,
        label_words: Mapping[Any, str] | None = None,
        prompt_template: str = DEFAULT_PROMPT_TEMPLATE,
        target_template: str = DEFAULT_TARGET_TEMPLATE,
    ) -> ClassificationTask:
        """Build a task from a ``{label: word}`` mapping.

        Args:
            label_words: Label value (int or str) to word; default ``{0: "negative", 1: "positive"}``.
            prompt_template: Template with ``{text}``.
            target_template: Template with ``{label_word}``.

        Returns:
            The task.

        Raises:
            ConfigError: Empty or duplicate labels/words, or a template without its field.
        """
        mapping = dict(DEFAULT_LABEL_WORDS if label_words is None else label_words)
        return cls(
            labels=tuple(str(k) for k in mapping),
            words=tuple(str(v) for v in mapping.values()),
            prompt_template=prompt_template,
            target_template=target_template,
        )

    def prompt(self, text: str) -> str:
        """Return the prompt for one input text."""
        return self.prompt_template.format(text=text)

    def targets(self) -> list[str]:
        """Return the answer string of every label, in label order (``[" negative", " positive"]``)."""
        return [self.target_template.format(label_word=w) for w in self.words]

    def label_index(self, label: Any) -> int:
        """Return the position of a label value in :attr:`labels`.

        Args:
            label: A label key (``1``, ``"1"``) or a label word (``"positive"``).

        Returns:
            Index into :attr:`labels` / :attr:`words`.

        Raises:
            DataError: The value is neither a known key nor a label word (bools and floats are refused).
        """
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise DataError(f"label {label!r} must be an int or a string")
        key = str(label).strip()
        if key in self.labels:
            return self.labels.index(key)
        if key in self.words:
            return self.words.index(key)
        known = ", ".join(f"{k} ({w})" for k, w in zip(self.labels, self.words))
        raise DataError(f"label {label!r} is not one of the task's labels: {known}")

    def first_answer_tokens(self, tokenizer: Any) -> list[int]:
        """The first token id of each label's answer, in label order (the ``label_words`` objective).

        Raises:
            DataError: An answer tokenizes to nothing, or two answers start with the same token
                (then only the ``answer`` objective can tell them apart).
        """
        ids = []
        for target in self.targets():
            tokens = tokenizer(target, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise DataError(f"answer {target!r} tokenizes to no tokens")
            ids.append(int(tokens[0]))
        if len(set(ids)) != len(ids):
            raise DataError(
                f"the answers {self.targets()} do not start with distinct tokens ({ids}); "
                "use training objective 'answer' or label words that differ in their first token"
            )
        return ids

    def example(self, text: str, label: Any) -> Example:
        """Turn one classification row into an :class:`Example`.

        Raises:
            DataError: Unknown label.
        """
        index = self.label_index(label)
        return Example(prompt=self.prompt(text), answer=self.targets()[index], label=index)


def _check_template(template: str, field: str, what: str) -> None:
    try:
        template.format(**{field: "x"})
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{what} {template!r} may only use the field {{{field}}}: {exc!r}") from exc
    if "{" + field + "}" not in template:
        raise ConfigError(f"{what} {template!r} must contain {{{field}}}")


def encode_pair(
    tokenizer: Any, prompt: str, answer: str, max_length: int, *, add_eos: bool = False
) -> tuple[list[int], int]:
    """Tokenize a prompt and its answer for causal-LM training or scoring.

    The prompt is tokenized with the tokenizer's special tokens (a BOS where the model uses
    one), the answer without, and the two are concatenated, so the answer tokens are the same
    whatever the prompt. When the pair is longer than ``max_length`` the prompt loses tokens
    from its left (keeping a leading BOS), so the answer and the text nearest to it survive;
    an answer that alone does not fit is cut on its right, keeping one prompt token.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: Conditioning text.
        answer: Target text.
        max_length: Longest sequence to return (>= 2).
        add_eos: Append the tokenizer's EOS token to the answer (generation tasks, so the
            model learns to stop).

    Returns:
        ``(ids, n_answer)``: the token ids (length <= ``max_length``) and how many of the last
        ids belong to the answer (>= 1).

    Raises:
        DataError: The answer tokenizes to nothing, or ``max_length`` < 2.
    """
    if max_length < 2:
        raise DataError(f"sequence length must be at least 2 tokens, got {max_length}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        answer_ids.append(int(tokenizer.eos_token_id))
    if not answer_ids:
        raise DataError(f"answer {answer!r} tokenizes to no tokens")
    bos = getattr(tokenizer, "bos_token_id", None)
    keep_bos = bool(prompt_ids) and bos is not None and prompt_ids[0] == bos
    if len(answer_ids) > max_length - 1:
        answer_ids = answer_ids[: max_length - 1]
    room = max_length - len(answer_ids)
    if len(prompt_ids) > room:
        if keep_bos and room >= 2:
            prompt_ids = [prompt_ids[0]] + prompt_ids[len(prompt_ids) - room + 1 :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
    if not prompt_ids:
        # Without a context token there is no position whose prediction is the first answer
        # token; an empty prompt on a tokenizer without BOS would otherwise train on nothing.
        raise DataError(f"prompt {prompt!r} tokenizes to no tokens and the tokenizer adds no BOS")
    return prompt_ids + answer_ids, len(answer_ids)


def _model_device(model: Any) -> torch.device:
    import torch

    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def label_word_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    label_words: Sequence[str],
    *,
    target_template: str = DEFAULT_TARGET_TEMPLATE,
    batch_size: int = 8,
    max_length: int = 512,
) -> torch.Tensor:
    """Log-likelihood of each label word's answer after each prompt.

    The answer for a word is ``target_template.format(label_word=word)`` (``" positive"``),
    tokenized as in :func:`encode_pair`. For a one-token answer the score is the next-token
    log-probability; for longer answers it is the sum over the answer's tokens. When every
    answer is one token a single forward pass per batch scores all labels.

    On CPU with bitsandbytes 4-bit weights, call this only on a model loaded with the
    AVX512_BF16 workaround (see ``shared.subllm``): a no-grad pass otherwise repacks the
    weights into a layout that breaks later training.

    Args:
        model: A causal LM (plain, 4-bit, or PEFT-wrapped); it is put in eval mode for the call
            and restored afterwards.
        tokenizer: Its tokenizer.
        prompts: N prompt strings.
        label_words: K label words.
        target_template: Template with ``{label_word}``.
        batch_size: Sequences per forward pass.
        max_length: Longest sequence; longer prompts lose tokens on the left.

    Returns:
        Float32 CPU tensor of shape ``[N, K]``.

    Raises:
        DataError: No label words, or an answer that tokenizes to nothing.
    """
    import torch

    if not label_words:
        raise DataError("scoring needs at least one label word")
    targets = [target_template.format(label_word=w) for w in label_words]
    if not prompts:
        return torch.empty(0, len(targets), dtype=torch.float32)
    encoded = [[encode_pair(tokenizer, p, t, max_length) for t in targets] for p in prompts]
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    single = all(n == 1 for row in encoded for _, n in row)
    out = torch.empty(len(prompts), len(targets), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if single:
                # encode_pair tokenizes answers alone, so their ids are the same after every prompt.
                answer_ids = torch.tensor([ids[-1] for ids, _ in encoded[0]])
                # Batch prompts of similar length together: padding is wasted compute.
                order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0][0]))
                for start in range(0, len(order), batch_size):
                    index = order[start : start + batch_size]
                    rows = [encoded[i][0][0][:-1] for i in index]
                    logits = _forward(model, rows, pad_id, device)
                    last = torch.tensor([len(r) - 1 for r in rows])
                    logp = torch.log_softmax(logits[torch.arange(len(rows)), last].float(), dim=-1).cpu()
                    out[index] = logp[:, answer_ids]
            else:
                pairs = [(i, k) for i in range(len(prompts)) for k in range(len(targets))]
                for start in range(0, len(pairs), batch_size):
                    chunk = pairs[start : start + batch_size]
                    rows = [encoded[i][k][0] for i, k in chunk]
                    logits = _forward(model, rows, pad_id, device)
                    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                    for b, (i, k) in enumerate(chunk):
                        ids, n_answer = encoded[i][k]
                        positions = torch.arange(len(ids) - n_answer - 1, len(ids) - 1)
                        tokens = torch.tensor(ids[len(ids) - n_answer :])
                        out[i, k] = logp[b, positions, tokens].sum()
    finally:
        model.train(was_training)
    return out


def _forward(model: Any, rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Run right-padded rows through the model; returns logits ``[B, T, V]``."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits


def score_label_words(
    model: Any, tokenizer: Any, prompts: Sequence[str], label_words: Sequence[str], **options: Any
) -> list[int]:
    """Predict a label for each prompt: the label word with the highest log-likelihood.

    Args:
        model: A causal LM (see :func:`label_word_logprobs`).
        tokenizer: Its tokenizer.
        prompts: N prompt strings (e.g. ``ClassificationTask.prompt(text)``).
        label_words: K label words (e.g. ``ClassificationTask.words``).
        **options: ``target_template``, ``batch_size``, ``max_length`` of
            :func:`label_word_logprobs`.

    Returns:
        N indices into ``label_words`` (ties go to the lower index).
    """
    scores = label_word_logprobs(model, tokenizer, prompts, label_words, **options)
    return [int(i) for i in scores.argmax(dim=1)]


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label.

    Raises:
        DataError: The sequences differ in length or are empty.
    """
    if len(predictions) != len(labels) or not labels:
        raise DataError(f"accuracy needs equally long, non-empty lists (got {len(predictions)} and {len(labels)})")
    return sum(int(p == y) for p, y in zip(predictions, labels)) / len(labels)


def read_jsonl_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Read a JSONL file: one JSON object per line, blank lines skipped.

    Args:
        path: The file.

    Returns:
        ``(line number, object)`` pairs in file order.

    Raises:
        DataError: Unreadable, not UTF-8, or a line that is not a JSON object (named by line).
    """
    rows = []
    try:
        with path.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
                rows.append((number, row))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from exc
    return rows
