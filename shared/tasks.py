"""The task a run fine-tunes for: one definition, sent by the coordinator, used by both roles.

A :class:`TaskSpec` says how a data row becomes a prompt and the answer the model learns,
and how answers are judged. The coordinator reads it from its run config (``[task]``, or a
preset), publishes it in every schedule, evaluates with it; each client formats its private
rows with it, so the two never disagree on a template or a label word. Three kinds:

* ``classification``: ``prompt_template`` over the row's fields (``"Review: {text}\\nSentiment:"``),
  the answer is the label's word(s) from ``label_words`` (``{"0": "negative", "1": "positive"}``;
  a row's label may be the key or the word itself; multi-token words are fine). Judged by which
  label's answer the model finds most likely: ``accuracy`` or ``macro_f1``.
* ``multiple_choice``: the row has a question and a list of options (``options_field``); the
  template's ``{options}`` renders them as ``A) ...`` lines and the answer is the right letter
  (the row's answer may be a letter, ``"c) Mite"``, a 0-based index or the option's text).
  Judged like classification, over the question's letters: ``accuracy``.
* ``generation``: the answer is the row's ``answer_field`` as written. Judged by greedy decoding
  up to ``max_new_tokens``: ``exact_match`` after a ``normalizer`` (``last_number`` for GSM-style
  answers) or ``rougeL``.

Nothing here imports the coordinator, the client or torch.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from shared.errors import ConfigError, DataError

KINDS = ("classification", "multiple_choice", "generation")
#: The metrics each kind may report; the first is its default.
METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy", "macro_f1"),
    "multiple_choice": ("accuracy",),
    "generation": ("exact_match", "rougeL"),
}
NORMALIZERS = ("none", "strip", "last_number")
#: Letters that name multiple-choice options, in order.
OPTION_LETTERS = string.ascii_uppercase
MAX_NEW_TOKENS = 1024
MAX_TEMPLATE_CHARS = 4096
MAX_LABELS = 256


@dataclass(frozen=True)
class Example:
    """One row of a task as the model sees it.

    Attributes:
        prompt: Text the model conditions on.
        answer: Text the model learns to produce after the prompt (the loss is on it).
        label: Classification: the label's index in :attr:`TaskSpec.labels`; multiple choice:
            the right option's index; None for generation.
        choices: The candidate answers, in label/option order (classification and multiple
            choice; empty for generation): what evaluation compares.
        reference: The row's answer as written (generation: what a prediction is matched to).
    """

    prompt: str
    answer: str
    label: int | None = None
    choices: tuple[str, ...] = ()
    reference: str = ""


@dataclass(frozen=True)
class TaskSpec:
    """How rows become prompts and answers, and how answers are judged (see the module docstring).

    Attributes:
        kind: ``classification``, ``multiple_choice`` or ``generation``.
        prompt_template: ``str.format`` template over the row's fields; a multiple-choice
            template has ``{options}`` (rendered ``A) ...`` lines) besides the question's field.
        target_template: Template of the answer the model learns, with ``{answer}``: the label
            word(s), the option letter, or the row's answer.
        answer_field: The row's field holding the label (classification), the right option
            (multiple choice) or the answer (generation).
        label_words: Classification: label -> its word(s), in prediction order.
        options_field: Multiple choice: the row's field holding the list of options.
        metric: What evaluation reports (:data:`METRICS` of the kind; "" = its default).
        normalizer: Generation with ``exact_match``: ``none``, ``strip`` or ``last_number``.
        max_new_tokens: Generation: the most tokens decoded per answer.
        chat_template: Generation: wrap each prompt in the tokenizer's chat template.
        name: What to call the task in reports (a preset's name, or the user's).
    """

    kind: str = "classification"
    prompt_template: str = "Review: {text}\nSentiment:"
    target_template: str = " {answer}"
    answer_field: str = "label"
    label_words: dict[str, str] = field(default_factory=lambda: {"0": "negative", "1": "positive"})
    options_field: str = "options"
    metric: str = ""
    normalizer: str = "none"
    max_new_tokens: int = 32
    chat_template: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.kind not in KINDS:
            raise ConfigError(f"task.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "label_words", {str(k): str(v) for k, v in self.label_words.items()})
        if not self.metric:
            object.__setattr__(self, "metric", METRICS[self.kind][0])
        if self.metric not in METRICS[self.kind]:
            problems.append(f"task.metric {self.metric!r} does not judge a {self.kind} task: use {', '.join(METRICS[self.kind])}")
        if self.normalizer not in NORMALIZERS:
            problems.append(f"task.normalizer must be one of {', '.join(NORMALIZERS)}, got {self.normalizer!r}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            problems.append(f"task.max_new_tokens must be in 1..{MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        problems += _template_problems(self.prompt_template, "task.prompt_template")
        problems += _template_problems(self.target_template, "task.target_template", only={"answer"}, required={"answer"})
        if not self.answer_field:
            problems.append("task.answer_field must name the row's answer or label field")
        if len(self.label_words) > MAX_LABELS or any(len(k) > 256 or len(v) > 256 for k, v in self.label_words.items()):
            problems.append(f"task.label_words may hold at most {MAX_LABELS} labels of at most 256 characters")
        if self.kind == "classification":
            words = list(self.label_words.values())
            if len(words) < 2:
                problems.append("a classification task needs at least two label_words")
            if len(set(words)) != len(words) or any(not w.strip() for w in words):
                problems.append(f"label words must be distinct and non-empty, got {self.label_words}")
        if self.kind == "multiple_choice" and "options" not in self.prompt_fields():
            problems.append("a multiple_choice prompt_template needs {options} (where the lettered options go)")
        if problems:
            raise ConfigError("invalid task: " + "; ".join(problems))

    @classmethod
    def for_kind(cls, kind: str, **changes: Any) -> TaskSpec:
        """A task of ``kind`` with that kind's usual fields (:data:`KIND_DEFAULTS`), then ``changes``."""
        if kind not in KIND_DEFAULTS:
            raise ConfigError(f"task.kind must be one of {', '.join(KINDS)}, got {kind!r}")
        return cls(**{**KIND_DEFAULTS[kind], **changes})

    # ------------------------------------------------------------------ reading it

    def prompt_fields(self) -> tuple[str, ...]:
        """The fields the prompt template uses, in order (``{options}`` included)."""
        return tuple(dict.fromkeys(name for _, name, _, _ in string.Formatter().parse(self.prompt_template) if name))

    def row_fields(self) -> tuple[str, ...]:
        """The fields a row of this task must have."""
        fields = [f for f in self.prompt_fields() if not (self.kind == "multiple_choice" and f == "options")]
        if self.kind == "multiple_choice":
            fields.append(self.options_field)
        return (*fields, self.answer_field)

    @property
    def labels(self) -> tuple[str, ...]:
        """Classification: the label keys, in prediction order."""
        return tuple(self.label_words)

    def label_index(self, value: Any) -> int:
        """The index of a classification row's label: its key (``1``, ``"1"``) or its word.

        Raises:
            DataError: Neither a key nor a word of the task (bools and floats are refused).
        """
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise DataError(f"label {value!r} must be an int or a string")
        key = str(value).strip()
        if key in self.label_words:
            return self.labels.index(key)
        words = list(self.label_words.values())
        if key in words:
            return words.index(key)
        known = ", ".join(f"{k} ({w})" for k, w in self.label_words.items())
        raise DataError(f"label {value!r} is not one of the task's labels: {known}")

    def classification_choices(self) -> tuple[str, ...]:
        """Classification: every label's answer text, in label order (``(" negative", " positive")``)."""
        return tuple(self.target_template.format(answer=w) for w in self.label_words.values())

    # ------------------------------------------------------------------ rows -> examples

    def example(self, row: Mapping[str, Any], where: str = "row") -> Example:
        """Turn one data row into an :class:`Example`.

        Args:
            row: The row (a JSON object or a CSV row).
            where: ``file:line`` for error messages.

        Raises:
            DataError: A field the task needs is missing or empty, a label is unknown, or a
                multiple-choice answer names no option; the message starts with ``where``.
        """
        try:
            return self._example(row)
        except DataError as exc:
            raise DataError(f"{where}: {exc}") from None

    def _example(self, row: Mapping[str, Any]) -> Example:
        values = {name: _text(row, name) for name in self.prompt_fields() if not self._is_options(name)}
        raw_answer = _present(row, self.answer_field)
        if self.kind == "classification":
            label = self.label_index(raw_answer)
            choices = self.classification_choices()
            return Example(self.prompt_template.format(**values), choices[label], label, choices, str(raw_answer))
        if self.kind == "multiple_choice":
            options = _options(row, self.options_field)
            values["options"] = "\n".join(f"{OPTION_LETTERS[i]}) {o}" for i, o in enumerate(options))
            label = _option_index(raw_answer, options)
            choices = tuple(self.target_template.format(answer=OPTION_LETTERS[i]) for i in range(len(options)))
            return Example(self.prompt_template.format(**values), choices[label], label, choices, OPTION_LETTERS[label])
        reference = _text(row, self.answer_field)
        return Example(self.prompt_template.format(**values), self.target_template.format(answer=reference), reference=reference)

    def _is_options(self, name: str) -> bool:
        return self.kind == "multiple_choice" and name == "options"

    def examples(self, rows: Iterable[tuple[int, Mapping[str, Any]]], source: str) -> list[Example]:
        """Every row as an :class:`Example`; the first bad row fails, named ``source:line``.

        Raises:
            DataError: No rows, or a row that does not fit the task.
        """
        out = [self.example(row, f"{source}:{number}") for number, row in rows]
        if not out:
            raise DataError(f"{source}: holds no examples")
        return out

    def label_of(self, row: Mapping[str, Any]) -> int | None:
        """A row's label index (classification) or right option (multiple choice), for
        splitting data by label; None for generation or a row whose label does not parse."""
        try:
            example = self._example(row)
        except DataError:
            return None
        return example.label

    def fill_prompt(self, text: str) -> str:
        """The prompt for a piece of plain text put in the template's one field (calibration text).

        Raises:
            ConfigError: The template has more than one field (or only ``{options}``).
        """
        fields = [f for f in self.prompt_fields() if not self._is_options(f)]
        if len(fields) != 1 or len(self.prompt_fields()) != 1:
            raise ConfigError(
                f"plain text can fill a prompt template of one field only; {self.prompt_template!r} has "
                f"{', '.join(self.prompt_fields()) or 'none'}"
            )
        return self.prompt_template.format(**{fields[0]: text})


KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"kind": "classification", "prompt_template": "Review: {text}\nSentiment:", "answer_field": "label"},
    "multiple_choice": {"kind": "multiple_choice", "prompt_template": "Question: {question}\n{options}\nAnswer:",
                        "answer_field": "answer", "label_words": {}},
    "generation": {"kind": "generation", "prompt_template": "{prompt}", "answer_field": "answer", "label_words": {}},
}
"""Each kind's usual row fields: ``text``/``label``, ``question``/``options``/``answer``, ``prompt``/``answer``."""


def _template_problems(template: str, what: str, *, only: set[str] | None = None, required: set[str] | None = None) -> list[str]:
    if len(template) > MAX_TEMPLATE_CHARS:
        return [f"{what} is longer than {MAX_TEMPLATE_CHARS} characters"]
    try:
        parts = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        return [f"{what} {template!r} is not a valid template ({exc})"]
    names = {name for name, _, _ in parts}
    problems = []
    # Plain names only: an attribute or index ("{text.__class__}") would reach into Python
    # objects, and a format spec ("{text:>999999999}") could make a string of any size; the
    # task arrives over the network, so neither may pass.
    if any(not n.isidentifier() or spec or conv for n, spec, conv in parts):
        problems.append(f"{what} {template!r} may only use plain {{field}} names (no attributes, indexes or format specs)")
    if only is not None and names - only:
        problems.append(f"{what} {template!r} may only use {', '.join('{' + n + '}' for n in sorted(only))}")
    if required is not None and required - names:
        problems.append(f"{what} {template!r} must contain {', '.join('{' + n + '}' for n in sorted(required))}")
    return problems


def _present(row: Mapping[str, Any], name: str) -> Any:
    if name not in row or row[name] is None:
        raise DataError(f"missing field {name!r}")
    value = row[name]
    if isinstance(value, str) and not value.strip():
        raise DataError(f"field {name!r} is empty")
    return value


def _text(row: Mapping[str, Any], name: str) -> str:
    value = _present(row, name)
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"field {name!r} must be text, got {type(value).__name__}")
    return str(value)


def _options(row: Mapping[str, Any], name: str) -> list[str]:
    value = _present(row, name)
    if isinstance(value, str):  # a CSV cell: options separated by " | "
        value = [part.strip() for part in value.split("|")]
    if not isinstance(value, Sequence) or not 2 <= len(value) <= len(OPTION_LETTERS):
        raise DataError(f"field {name!r} must be a list of 2 to {len(OPTION_LETTERS)} options")
    options = [str(o).strip() for o in value]
    if any(not o for o in options):
        raise DataError(f"field {name!r} has an empty option")
    return options


def _option_index(answer: Any, options: Sequence[str]) -> int:
    """The option an answer names: a letter, ``"c) text"``, a 0-based index, or the option's text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(options):
            return answer
    elif isinstance(answer, str):
        text = answer.strip()
        head = text[:1].upper()
        if len(text) == 1 or text[1:2] in (")", ".", ":"):
            if head in OPTION_LETTERS[: len(options)]:
                return OPTION_LETTERS.index(head)
        lowered = [o.lower() for o in options]
        if text.lower() in lowered:
            return lowered.index(text.lower())
    letters = ", ".join(OPTION_LETTERS[: len(options)])
    raise DataError(f"answer {answer!r} names none of the {len(options)} options (use a letter {letters}, an index or the option's text)")
