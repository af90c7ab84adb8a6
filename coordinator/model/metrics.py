"""Task metrics per example, and their confidence intervals.

Scoring takes two steps so that every task reports the same way: a scorer turns predictions
into one float per example (:func:`exact_match`, :func:`rouge_l_scores`,
:func:`accuracy_scores`), and :func:`summarize` turns those into a :class:`MetricValue`, the
mean with its interval: Wilson's score interval when every score is 0 or 1, a percentile
bootstrap otherwise. A metric that is not a mean of per-example scores (macro-F1) goes through
:func:`bootstrap_interval` with a statistic over resampled example indices, and
:func:`paired_difference` compares two runs on the same examples (after vs before).

Pure Python (no torch, no numpy) and seeded: the same scores always give the same interval.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from decimal import Decimal
from statistics import NormalDist

from shared.errors import ConfigError

#: The answer normalizers :func:`normalize_answer` knows.
NORMALIZERS = ("none", "strip", "last_number")

# A number: a minus sign only where it is not a hyphen or a subtraction ("5-3" ends in 3, not
# -3); digits, with commas only as thousands groups ("1,234"; "3,4" is two numbers); an optional
# decimal part ("7." is 7: a full stop is not a decimal point). A number may not start right
# after a digit or a point, so "3.14.15" does not end in ".15".
_NUMBER = re.compile(r"(?:(?<![\w-])-)?(?<![\d.])(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")


@dataclass(frozen=True)
class MetricValue:
    """A metric over a test set with its confidence interval ``[low, high]``.

    Attributes:
        name: What was measured (``"accuracy"``, ``"rouge_l"``, ...).
        value: The point estimate; ``low`` and ``high`` bound it.
        n: Number of examples.
        method: ``"wilson"``, ``"bootstrap"`` or ``"paired_bootstrap"``.
    """

    name: str
    value: float
    low: float
    high: float
    n: int
    method: str

    def to_dict(self) -> dict[str, float | int | str]:
        """Plain values for a JSON report."""
        return asdict(self)


def normalize_answer(text: str, normalizer: str) -> str:
    """Put an answer in the form exact match compares.

    Args:
        text: A model's answer or a reference.
        normalizer: ``"none"`` (unchanged); ``"strip"`` (whitespace stripped, lowercased, inner
            whitespace collapsed, a trailing period dropped); ``"last_number"`` (the text's last
            number, canonical: ``"1,234.50"`` -> ``"1234.5"``; ``""`` when it has none).

    Returns:
        The normalized answer.

    Raises:
        ConfigError: Unknown normalizer.
    """
    if normalizer == "none":
        return text
    if normalizer == "strip":
        return " ".join(text.lower().split()).removesuffix(".").rstrip()
    if normalizer == "last_number":
        found = _NUMBER.findall(text)
        if not found:
            return ""
        number = Decimal(found[-1].replace(",", ""))
        # Decimal keeps "1234.50" exact where a float would not; "f" stops 1200 becoming 1.2E+3.
        return "0" if number == 0 else format(number.normalize(), "f")
    raise ConfigError(f"unknown answer normalizer {normalizer!r}: choose one of {', '.join(NORMALIZERS)}")


def _check_paired(first: Sequence, second: Sequence, what: str) -> None:
    if len(first) != len(second):
        raise ConfigError(f"{what}: {len(first)} against {len(second)}; they must pair up one to one")


def exact_match(predictions: Sequence[str], references: Sequence[str], normalizer: str) -> list[float]:
    """1.0 where a prediction equals its reference after normalizing both, else 0.0.

    Under ``"last_number"`` a prediction without a number scores 0.0 even against a reference
    without one: both normalize to ``""``, but no number is no answer.

    Args:
        predictions, references: Model answers and gold answers, one per prediction.
        normalizer: One of :data:`NORMALIZERS` (see :func:`normalize_answer`).

    Returns:
        One score per example.

    Raises:
        ConfigError: Unknown normalizer, or the two lists differ in length.
    """
    _check_paired(predictions, references, "predictions and references")
    if normalizer not in NORMALIZERS:
        normalize_answer("", normalizer)  # raises, naming the choices
    scores = []
    for prediction, reference in zip(predictions, references):
        answer = normalize_answer(prediction, normalizer)
        matched = answer == normalize_answer(reference, normalizer)
        scores.append(1.0 if matched and (answer or normalizer != "last_number") else 0.0)
    return scores


def _rouge_tokens(text: str) -> list[str]:
    tokens = (word.strip(string.punctuation) for word in text.lower().split())
    return [token for token in tokens if token]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    # One DP row at a time: O(len(a) * len(b)) time, O(len(b)) memory.
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (beta = 1) of a prediction against one reference.

    Tokens are the lowercased whitespace-separated words with punctuation stripped from both
    ends (a token of punctuation alone disappears). With ``L`` the length of the longest common
    subsequence, precision is ``L / len(prediction)``, recall ``L / len(reference)``, and the
    score their harmonic mean; 0.0 when either side has no token.
    """
    pred, ref = _rouge_tokens(prediction), _rouge_tokens(reference)
    common = _lcs_length(pred, ref) if pred and ref else 0
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_scores(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """:func:`rouge_l` of each prediction against its reference (ConfigError if lengths differ)."""
    _check_paired(predictions, references, "predictions and references")
    return [rouge_l(p, r) for p, r in zip(predictions, references)]


def accuracy_scores(predicted: Sequence[int], gold: Sequence[int]) -> list[float]:
    """1.0 where the predicted class is the gold one, else 0.0 (ConfigError if lengths differ)."""
    _check_paired(predicted, gold, "predicted and gold labels")
    return [1.0 if p == g else 0.0 for p, g in zip(predicted, gold)]


def macro_f1(predicted: Sequence[int], gold: Sequence[int], num_classes: int) -> float:
    """Unweighted mean over classes of each class's F1 (that class against the rest).

    A class that is neither any example's gold nor any prediction is left out of the mean: its
    F1 is undefined, and counting it as 0 or 1 would move the score for nothing. A prediction
    outside ``0 .. num_classes - 1`` (say -1 for an answer that could not be parsed) is wrong
    for its gold class and is no class's prediction.

    Args:
        predicted, gold: Predicted and gold class per example, gold in ``0 .. num_classes - 1``.
        num_classes: Number of classes.

    Returns:
        Macro-F1 in [0, 1].

    Raises:
        ConfigError: Lengths differ, no example, ``num_classes`` < 1, or a gold label out of range.
    """
    _check_paired(predicted, gold, "predicted and gold labels")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    if not gold:
        raise ConfigError("macro-F1 of no examples is undefined")
    bad = sorted({g for g in gold if not 0 <= g < num_classes})
    if bad:
        raise ConfigError(f"gold labels {bad} are outside 0..{num_classes - 1}")
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for p, g in zip(predicted, gold):
        if p == g:
            tp[g] += 1
            continue
        fn[g] += 1
        if 0 <= p < num_classes:
            fp[p] += 1
    f1 = [2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in range(num_classes) if tp[c] + fp[c] + fn[c]]
    return sum(f1) / len(f1)


def _z_value(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be strictly between 0 and 1, got {confidence}")
    return NormalDist().inv_cdf(1.0 - (1.0 - confidence) / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ``successes / n``.

    Unlike the normal approximation it stays inside [0, 1] and does not collapse to a point at
    0 or n successes, which matters for small test sets and near-perfect scores.

    Returns:
        ``(low, high)``.

    Raises:
        ConfigError: ``n`` < 1, ``successes`` outside ``0 .. n``, or ``confidence`` outside (0, 1).
    """
    if n < 1:
        raise ConfigError(f"a Wilson interval needs at least one example, got n = {n}")
    if not 0 <= successes <= n:
        raise ConfigError(f"successes must be within 0..{n}, got {successes}")
    z = _z_value(confidence)
    p = successes / n
    denominator = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4 * n * n)) / denominator
    # At 0 (n) successes the low (high) end is exactly 0 (1); rounding would leave 1e-17 off.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def _percentile(ordered: Sequence[float], q: float) -> float:
    # Linear interpolation between the closest ranks (numpy's default "linear" method).
    position = q * (len(ordered) - 1)
    below = math.floor(position)
    above = min(below + 1, len(ordered) - 1)
    return ordered[below] + (ordered[above] - ordered[below]) * (position - below)


def bootstrap_interval(
    scores: Sequence[float],
    statistic: Callable[[Sequence[int]], float] | None = None,
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval, resampling example indices with replacement.

    Args:
        scores: One value per example. The default statistic is their mean; a custom one uses
            only their count.
        statistic: Called with each resample's example indices (``n`` of them, with repeats);
            returns the metric on those examples, e.g. macro-F1 of the resampled predictions.
        confidence: Two-sided coverage.
        resamples: Bootstrap resamples.
        seed: Seed of the ``random.Random`` that draws the indices.

    Returns:
        ``(low, high)``: the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of
        the resampled statistic.

    Raises:
        ConfigError: No scores, ``resamples`` < 1, or ``confidence`` outside (0, 1).
    """
    _z_value(confidence)  # validates it
    n = len(scores)
    if n == 0:
        raise ConfigError("a bootstrap interval needs at least one example")
    if resamples < 1:
        raise ConfigError(f"resamples must be at least 1, got {resamples}")
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        indices = rng.choices(range(n), k=n)
        values.append(statistic(indices) if statistic is not None else sum(scores[i] for i in indices) / n)
    values.sort()
    alpha = 1.0 - confidence
    return _percentile(values, alpha / 2), _percentile(values, 1.0 - alpha / 2)


def summarize(
    name: str, per_example: Sequence[float], *, binary: bool, confidence: float = 0.95, seed: int = 0
) -> MetricValue:
    """The mean of per-example scores with its confidence interval.

    Args:
        name: Metric name for the report.
        per_example: One score per example.
        binary: Every score is 0 or 1 (accuracy, exact match): a Wilson interval. Otherwise
            (ROUGE-L) a percentile bootstrap of the mean, 1000 resamples.
        confidence, seed: Two-sided coverage; bootstrap seed (Wilson needs none).

    Returns:
        The metric.

    Raises:
        ConfigError: No scores, or ``binary`` with a score other than 0 or 1.
    """
    n = len(per_example)
    if n == 0:
        raise ConfigError(f"metric {name!r} has no examples to summarize")
    value = sum(per_example) / n
    if binary:
        odd = sorted({s for s in per_example if s not in (0, 1)})
        if odd:
            raise ConfigError(f"metric {name!r} is marked binary but has scores {odd[:5]}")
        return MetricValue(name, value, *wilson_interval(int(sum(per_example)), n, confidence), n, "wilson")
    return MetricValue(name, value, *bootstrap_interval(per_example, confidence=confidence, seed=seed), n, "bootstrap")


def paired_difference(
    a: Sequence[float],
    b: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
    name: str = "difference",
) -> MetricValue:
    """Mean of ``a - b`` over paired examples, with a paired bootstrap interval.

    Each resample takes both runs' scores at the same drawn indices, so what the examples share
    (an easy example is easy for both runs) cancels: the interval is that of the change, usually
    far narrower than the two runs' own intervals suggest.

    Args:
        a: One run's score per example (e.g. after fine-tuning).
        b: The other run's scores on the same examples, in the same order (before).
        confidence, resamples, seed: As for :func:`bootstrap_interval`.
        name: Metric name for the report.

    Returns:
        The difference, method ``"paired_bootstrap"``.

    Raises:
        ConfigError: The runs differ in length or have no example.
    """
    _check_paired(a, b, "paired scores")
    if not a:
        raise ConfigError("a paired difference needs at least one example")
    # Resampling indices of the differences is resampling both runs at the same indices.
    diffs = [x - y for x, y in zip(a, b)]
    low, high = bootstrap_interval(diffs, confidence=confidence, resamples=resamples, seed=seed)
    return MetricValue(name, sum(diffs) / len(diffs), low, high, len(diffs), "paired_bootstrap")
