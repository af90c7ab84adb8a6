"""Data partitioning for simulations, and run reports (tables, CSV, plots) from a run directory."""

from __future__ import annotations

import csv
import json
from collections import Counter

import pytest

from coordinator.run.reports import (
    load_report,
    per_client_rounds,
    render_summary,
    write_csv,
    write_plots,
)
from coordinator.simulate import partition_rows
from shared.errors import RunStateError


def _rows(n_per_label: int = 100) -> list[dict]:
    return [{"text": f"t{i}-{label}", "label": label} for label in (0, 1) for i in range(n_per_label)]


def test_iid_partition_is_disjoint_balanced_and_seeded():
    shares = partition_rows(_rows(), 4, scheme="iid", alpha=0.5, per_client=1000, seed=3)
    texts = [r["text"] for share in shares for r in share]
    assert len(texts) == len(set(texts)) == 200
    assert sorted(len(s) for s in shares) == [50, 50, 50, 50]
    assert shares == partition_rows(_rows(), 4, scheme="iid", alpha=0.5, per_client=1000, seed=3)
    assert shares != partition_rows(_rows(), 4, scheme="iid", alpha=0.5, per_client=1000, seed=4)


def test_dirichlet_partition_skews_labels_and_keeps_every_row_once():
    shares = partition_rows(_rows(500), 4, scheme="dirichlet", alpha=0.1, per_client=10_000, seed=0)
    texts = [r["text"] for share in shares for r in share]
    assert len(texts) == len(set(texts)) == 1000
    # With alpha = 0.1 at least one client is dominated by one label (IID would give ~50%).
    majority = [max(Counter(r["label"] for r in s).values()) / len(s) for s in shares if s]
    assert max(majority) > 0.8


def test_partition_caps_each_share():
    shares = partition_rows(_rows(), 2, scheme="iid", alpha=1.0, per_client=7, seed=0)
    assert [len(s) for s in shares] == [7, 7]


def _metric(name: str, value: float) -> dict:
    return {"name": name, "value": value, "low": value - 0.05, "high": value + 0.05, "n": 200, "method": "wilson"}


def _report(tmp_path) -> None:
    def update(client, round_, sent, received, loss):
        return {
            "round": round_, "client_id": client, "num_examples": 40,
            "metrics": {"loss_first": loss + 1, "loss_last": loss},
            "resources": {"peak_rss_bytes": 700 * 2**20, "peak_gpu_bytes": 0, "wall_seconds": 3.0, "cpu_seconds": 5.0,
                          "bytes_sent": sent, "bytes_received": received, "device_class": "cpu-16gb"},
        }

    report = {
        "run_id": "r", "phase": "finished", "method": "fedsoda",
        "rounds": [
            {"round": 1, "participants": {"a": "L4", "b": "L4"}, "reported": ["a", "b"], "dropouts": 0, "rejected": 0,
             "late": 0, "duplicates": 0, "examples": 80, "started_at": 0.0, "closed_at": 10.0, "outcome": "aggregated"},
            {"round": 2, "participants": {"a": "L4", "b": "L4"}, "reported": ["a"], "dropouts": 1, "rejected": 1,
             "late": 0, "duplicates": 2, "examples": 40, "started_at": 10.0, "closed_at": 25.0, "outcome": "aggregated"},
        ],
        "clients": {"a": {"tier": "L4", "accepted": True, "examples": 40}, "b": {"tier": "L4", "accepted": True, "examples": 40}},
        "assignments": {"a": {"budget_bytes": 2**30}, "b": {"budget_bytes": 2**30}},
        "updates": [update("a", 1, 1000, 50_000, 2.0), update("b", 1, 1100, 50_000, 2.5), update("a", 2, 2500, 60_000, 1.5)],
        "tiers": {"L4": {"layers": 4, "package_bytes": 10 * 2**20, "version": 2}},
        "results": {"adapter_dir": "adapter", "evaluation": {
            "task": "rotten_tomatoes", "kind": "classification", "metric": "accuracy", "test_examples": 200,
            "before": _metric("accuracy", 0.6), "after": _metric("accuracy", 0.7), "difference": _metric("difference", 0.1),
            "tiers": {"L4": _metric("accuracy", 0.65)},
        }},
        "round_evaluations": [{"round": 1, **_metric("accuracy", 0.62)}, {"round": 2, **_metric("accuracy", 0.68)}],
    }
    (tmp_path / "report.json").write_text(json.dumps(report))


def test_per_round_traffic_is_the_difference_of_cumulative_counters(tmp_path):
    _report(tmp_path)
    rows = per_client_rounds(load_report(tmp_path))
    a = [r for r in rows if r["client_id"] == "a"]
    assert [(r["round"], r["bytes_up"], r["bytes_down"]) for r in a] == [(1, 1000, 50_000), (2, 1500, 10_000)]


def test_csv_and_plots_are_written(tmp_path):
    _report(tmp_path)
    data = load_report(tmp_path)
    path = write_csv(data, tmp_path / "rows.csv")
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3 and rows[0]["client_id"] == "a"
    written = write_plots(data, tmp_path / "plots")
    assert [p.name for p in written] == ["loss_accuracy.png", "bytes_per_round.png", "memory_per_client.png"]
    assert all(p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG" for p in written)


def test_a_run_without_a_report_is_a_clear_error(tmp_path):
    with pytest.raises(RunStateError, match="report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text("{not json")
    with pytest.raises(RunStateError, match="not valid JSON"):
        load_report(tmp_path)


def test_the_summary_shows_the_task_metric_with_its_interval_and_the_curve(tmp_path, capsys):
    _report(tmp_path)
    render_summary(load_report(tmp_path))
    shown = capsys.readouterr().err
    assert "rotten_tomatoes (classification), 200 test examples" in shown
    assert "full LLM + adapter" in shown and "accuracy 0.700 [0.650, 0.750]" in shown
    assert "difference +0.100 [+0.050, +0.150]" in shown
    assert "tier L4 + adapter" in shown
    assert "global adapter on the test set, by round" in shown and "accuracy 0.680 [0.630, 0.730]" in shown
