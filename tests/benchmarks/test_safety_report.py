"""benchmarks/safety.py's arithmetic and report, without its runs (those are the benchmark)."""

from __future__ import annotations

import math

import pytest

from benchmarks.safety import (
    mean_ci,
    signing_cost,
    summarize,
    write_markdown,
    write_plot,
)


def _run(setting: str, seed: int, accuracy: float) -> dict:
    return {"setting": setting, "seed": seed, "accuracy_after": accuracy, "accuracy_before": 0.76,
            "bytes_per_client": 1000.0 if setting == "on" else 990.0,
            "clipped": {"updates": 9, "weight_capped": 0, "clipped": 1 if setting == "on" else 0, "clipped_per_key": 0}}


def test_paired_difference_and_interval() -> None:
    runs = [_run("on", 0, 0.80), _run("off", 0, 0.78), _run("on", 1, 0.70), _run("off", 1, 0.70), _run("on", 2, 0.75)]
    summary = summarize(runs)
    assert summary["paired"]["seeds"] == [0, 1]  # seed 2 has no "off" run: not paired
    assert summary["paired"]["differences"] == pytest.approx([0.02, 0.0])
    m, lo, hi = summary["paired"]["difference"]
    assert m == pytest.approx(0.01) and lo < m < hi
    assert summary["paired"]["bytes_ratio"] == pytest.approx(1000 / 990)
    assert summary["on"]["clipped"]["clipped"] == 3
    assert mean_ci([0.5]) == (0.5, 0.5, 0.5)
    m, lo, hi = mean_ci([1.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(12.706 * math.sqrt(2) / math.sqrt(2))


def test_dp_runs_are_paired_against_plain_fedavg_with_their_budget() -> None:
    dp = {**_run("dp", 0, 0.6), "privacy": {"epsilon_aggregate": 9.8, "epsilon_coordinator": 18.9, "delta": 1e-5}}
    summary = summarize([_run("off", 0, 0.78), dp])
    assert summary["paired_dp"]["differences"] == pytest.approx([-0.18])
    assert summary["dp"]["epsilon_aggregate"] == 9.8 and summary["dp"]["epsilon_coordinator"] == 18.9
    assert "paired" not in summary  # no bounded run to pair


def test_signing_cost_is_measured_on_real_messages(tmp_path) -> None:
    signing = signing_cost(repeats=2)
    assert {row["extra_bytes"] for row in signing.values()} == {76}  # the signature field, whatever the message
    summary = summarize([_run("on", 0, 0.8), _run("off", 0, 0.79)])
    write_markdown(summary, signing, {"clients": 3, "rounds": 3, "test_examples": 200, "seeds": [0], "machine": "x"}, tmp_path / "s.md")
    text = (tmp_path / "s.md").read_text()
    assert "| bounded (defaults) | 0.800" in text and "+76" in text and "+1.0 points" in text
    write_plot(summary, tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
