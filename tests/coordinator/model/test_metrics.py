"""Task metrics and their intervals, against values worked out by hand."""

from __future__ import annotations

import random

import pytest

from coordinator.model.metrics import (
    MetricValue,
    accuracy_scores,
    bootstrap_interval,
    exact_match,
    macro_f1,
    normalize_answer,
    paired_difference,
    rouge_l,
    rouge_l_scores,
    summarize,
    wilson_interval,
)
from shared.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1,234.50", "1234.5"),
        ("-3", "-3"),
        ("7.", "7"),
        ("The answer is 1,234.", "1234"),
        ("She has 3 apples, then 5 more: 8 in all.", "8"),
        ("#### 72", "72"),
        ("$1,200", "1200"),  # no 1.2E+3
        ("0.50", "0.5"),
        ("-0", "0"),
        ("5-3", "3"),  # a subtraction, not minus three
        ("x = -3", "-3"),
        ("3,4", "4"),  # not a thousands group: two numbers
        ("no number here", ""),
    ],
)
def test_last_number(text, expected):
    assert normalize_answer(text, "last_number") == expected


def test_strip_and_none_normalizers():
    assert normalize_answer("  The   Eiffel\tTower. \n", "strip") == "the eiffel tower"
    assert normalize_answer("Paris", "strip") == "paris"
    assert normalize_answer("  Paris. ", "none") == "  Paris. "


def test_exact_match_per_normalizer():
    predictions = ["The answer is 1,234.", "First 12, then 13", "no idea", " Paris."]
    references = ["1234", "12", "0", "paris"]
    assert exact_match(predictions, references, "last_number") == [1.0, 0.0, 0.0, 0.0]  # 13 != 12
    assert exact_match(predictions, references, "strip") == [0.0, 0.0, 0.0, 1.0]
    assert exact_match(predictions, references, "none") == [0.0, 0.0, 0.0, 0.0]
    assert exact_match(["abc"], ["abc"], "none") == [1.0]
    # Neither side has a number: both normalize to "", but no number is no answer.
    assert exact_match(["no number"], ["none either"], "last_number") == [0.0]


def test_rouge_l_by_hand():
    # LCS "the cat on the mat" = 5 of 6 tokens on each side: P = R = 5/6, F = 5/6.
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # Case and end punctuation go: [the, cat, sat] against 6 tokens, LCS 3: P = 1, R = 1/2,
    # F = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert rouge_l("The cat, sat.", "the cat sat on the mat") == pytest.approx(2 / 3)
    # A subsequence keeps order: reversed, only one token lines up: P = R = 1/4, F = 1/4.
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)
    assert rouge_l("a b c d", "a b c d") == 1.0
    assert rouge_l("x y", "a b") == 0.0
    assert rouge_l("", "a b") == 0.0
    assert rouge_l("a b", " ... ") == 0.0  # punctuation alone is no token
    assert rouge_l_scores(["a b", "c"], ["a b", "d"]) == [1.0, 0.0]


def test_accuracy_and_macro_f1_on_an_unbalanced_set():
    gold = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1]
    predicted = [0, 0, 0, 0, 0, 0, 0, 1, 1, 0]
    assert sum(accuracy_scores(predicted, gold)) / 10 == pytest.approx(0.8)
    # Class 0: tp 7, fp 1 (a gold 1 said 0), fn 1 -> F1 = 2*7 / (2*7 + 1 + 1) = 14/16 = 0.875.
    # Class 1: tp 1, fp 1, fn 1 -> F1 = 2 / 4 = 0.5. Class 2: never gold, never predicted, left
    # out (counting it as 0 would give 0.458). Macro = (0.875 + 0.5) / 2 = 0.6875.
    assert macro_f1(predicted, gold, num_classes=3) == pytest.approx(0.6875)
    # A class predicted but never gold stays in with F1 0: class 0 tp 1, fn 1 -> 2/3; class 1
    # fp 1 -> 0; macro = 1/3.
    assert macro_f1([0, 1], [0, 0], num_classes=2) == pytest.approx(1 / 3)
    # An unparsable prediction (-1) is wrong for its gold class and nobody's prediction:
    # class 0 fn 1 -> 0; class 1 tp 1 -> 1; macro = 1/2.
    assert macro_f1([-1, 1], [0, 1], num_classes=2) == pytest.approx(0.5)


def test_wilson_against_textbook_values():
    low, high = wilson_interval(80, 100)
    assert (round(low, 4), round(high, 4)) == (0.7112, 0.8666)
    # At 0 successes the interval is [0, z^2 / (n + z^2)] = [0, 3.8415 / 13.8415] = [0, 0.2775].
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(10, 10)  # the mirror image
    assert high == 1.0 and low == pytest.approx(1 - 0.2775, abs=1e-4)
    narrow, wide = wilson_interval(80, 100, 0.90), wilson_interval(80, 100, 0.99)
    assert wide[0] < narrow[0] < 0.8 < narrow[1] < wide[1]


def test_bootstrap_is_seeded_and_the_custom_statistic_sees_the_same_draws():
    data = random.Random(3)
    scores = [data.random() for _ in range(50)]
    first = bootstrap_interval(scores, seed=7)
    assert bootstrap_interval(scores, seed=7) == first
    assert bootstrap_interval(scores, seed=8) != first
    mean = sum(scores) / len(scores)
    assert first[0] < mean < first[1]

    seen = []

    def mean_over(indices):
        seen.append(list(indices))
        return sum(scores[i] for i in indices) / len(indices)

    assert bootstrap_interval(scores, mean_over, seed=7, resamples=1000) == pytest.approx(first)
    assert len(seen) == 1000 and all(len(draw) == 50 and set(draw) <= set(range(50)) for draw in seen)
    assert bootstrap_interval([0.25] * 20) == (0.25, 0.25)


def test_bootstrap_covers_the_true_mean_about_95_percent_of_the_time():
    # 200 samples of 40 uniform(0, 1) scores (true mean 0.5). A percentile bootstrap at this
    # size covers a little under its nominal 95%; the data are seeded, so the count is fixed.
    data = random.Random(11)
    covered = 0
    for trial in range(200):
        sample = [data.random() for _ in range(40)]
        low, high = bootstrap_interval(sample, resamples=300, seed=trial)
        covered += low <= 0.5 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_macro_f1_through_the_bootstrap():
    gold = [0] * 30 + [1] * 10
    predicted = [0] * 27 + [1] * 3 + [1] * 6 + [0] * 4
    point = macro_f1(predicted, gold, 2)
    low, high = bootstrap_interval(
        gold, lambda idx: macro_f1([predicted[i] for i in idx], [gold[i] for i in idx], 2), seed=1
    )
    assert low < point < high and high - low > 0.05


def test_summarize_picks_wilson_or_bootstrap():
    binary = [1.0] * 80 + [0.0] * 20
    value = summarize("accuracy", binary, binary=True)
    assert value == MetricValue("accuracy", 0.8, *wilson_interval(80, 100), n=100, method="wilson")
    assert value.to_dict() == {
        "name": "accuracy",
        "value": 0.8,
        "low": value.low,
        "high": value.high,
        "n": 100,
        "method": "wilson",
    }
    graded = [0.1, 0.5, 0.9, 0.3, 0.7]
    value = summarize("rouge_l", graded, binary=False, seed=4)
    assert value.method == "bootstrap" and value.value == pytest.approx(0.5)
    assert (value.low, value.high) == bootstrap_interval(graded, seed=4)
    with pytest.raises(ConfigError, match="marked binary"):
        summarize("accuracy", graded, binary=True)
    with pytest.raises(ConfigError, match="no examples"):
        summarize("accuracy", [], binary=True)


def test_paired_difference_cancels_what_the_examples_share():
    data = random.Random(5)
    before = [data.random() for _ in range(100)]
    after = [b + 0.1 + data.uniform(-0.01, 0.01) for b in before]
    diff = paired_difference(after, before, seed=2)
    assert diff.method == "paired_bootstrap" and diff.n == 100 and diff.name == "difference"
    assert diff.low < diff.value < diff.high and diff.value == pytest.approx(0.1, abs=0.005)
    assert diff.value == pytest.approx(sum(a - b for a, b in zip(after, before)) / 100)
    # Each run alone spans about +-0.06 (scores spread over [0, 1]); unpaired resampling of the
    # two would give an interval of that order. The paired one is about +-0.001.
    single = bootstrap_interval(before, seed=2)
    assert diff.high - diff.low < (single[1] - single[0]) / 20
    assert paired_difference([1.0, 0.0], [1.0, 0.0], name="accuracy_gain").to_dict()["name"] == "accuracy_gain"


def test_errors_name_the_problem():
    with pytest.raises(ConfigError, match="none, strip, last_number"):
        normalize_answer("x", "lower")
    with pytest.raises(ConfigError, match="none, strip, last_number"):
        exact_match([], [], "lower")
    with pytest.raises(ConfigError, match="2 against 1"):
        exact_match(["a", "b"], ["a"], "none")
    with pytest.raises(ConfigError, match="n = 0"):
        wilson_interval(0, 0)
    with pytest.raises(ConfigError, match="within 0..10"):
        wilson_interval(11, 10)
    with pytest.raises(ConfigError, match="confidence"):
        wilson_interval(5, 10, confidence=1.0)
    with pytest.raises(ConfigError, match="at least one example"):
        bootstrap_interval([])
    with pytest.raises(ConfigError, match="resamples"):
        bootstrap_interval([1.0], resamples=0)
    with pytest.raises(ConfigError, match="outside 0..1"):
        macro_f1([0, 1], [0, 2], num_classes=2)
    with pytest.raises(ConfigError, match="3 against 2"):
        paired_difference([1.0, 0.0, 1.0], [1.0, 0.0])
