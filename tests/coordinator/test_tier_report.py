"""Per-tier results: a two-tier, two-precision report folded into one row per package."""

from __future__ import annotations

import json

from coordinator.run.reports import load_report, render_summary
from coordinator.run.tier_report import tier_rows

MIB = 2**20


def _metric(value: float) -> dict:
    return {"name": "accuracy", "value": value, "low": value - 0.05, "high": value + 0.05, "n": 200, "method": "wilson"}


def _update(client: str, round_: int, peak_mib: int, loss: float) -> dict:
    return {
        "round": round_, "client_id": client, "num_examples": 40, "metrics": {"loss_first": loss + 1, "loss_last": loss},
        "resources": {"peak_rss_bytes": peak_mib * MIB, "peak_gpu_bytes": 0, "wall_seconds": 3.0, "cpu_seconds": 5.0,
                      "bytes_sent": 1000 * round_, "bytes_received": 50_000 * round_, "device_class": "cpu-8gb"},
    }


def _two_tier_report(tmp_path) -> None:
    def plan(tier: str, estimate_mib: int) -> dict:
        return {"accepted": True, "tier": tier, "estimate_bytes": estimate_mib * MIB, "budget_bytes": 2 * estimate_mib * MIB}

    report = {
        "run_id": "mixed", "phase": "finished", "method": "fedsoda", "rounds": [],
        "clients": {c: {"tier": t, "accepted": True, "examples": 40} for c, t in (("cpu", "L24"), ("nano", "L16-bf16"), ("rtx", "L24"))},
        "assignments": {"cpu": plan("L24", 1100), "nano": plan("L16-bf16", 900), "rtx": plan("L24", 1200),
                        "tiny": {"accepted": False, "tier": "", "reason": "no prepared tier fits"}},
        "updates": [_update("cpu", 1, 1000, 2.0), _update("cpu", 2, 1050, 1.0), _update("rtx", 1, 1000, 3.0),
                    _update("nano", 1, 800, 2.5), _update("nano", 2, 820, 2.0)],
        "tiers": {
            "L16": {"tier": "L16", "precision": "nf4", "layers": 16, "package_bytes": 40 * MIB, "version": 1},
            "L16-bf16": {"tier": "L16", "precision": "bf16", "layers": 16, "package_bytes": 90 * MIB, "version": 1},
            "L24": {"tier": "L24", "precision": "nf4", "layers": 24, "package_bytes": 55 * MIB, "version": 1},
        },
        "results": {"evaluation": {
            "task": "t", "kind": "classification", "metric": "accuracy", "test_examples": 200,
            "before": _metric(0.6), "after": _metric(0.7), "difference": _metric(0.1),
            "tiers": {"L24": _metric(0.66), "L16-bf16": _metric(0.61), "L16": _metric(0.6)},
        }},
    }
    (tmp_path / "report.json").write_text(json.dumps(report))


def test_each_package_gets_its_clients_memory_against_the_plan_loss_and_metric(tmp_path):
    _two_tier_report(tmp_path)
    rows = {r["package"]: r for r in tier_rows(load_report(tmp_path))}
    assert [r["package"] for r in tier_rows(load_report(tmp_path))] == ["L24", "L16", "L16-bf16"]  # deepest first
    deep = rows["L24"]
    assert deep["clients"] == ["cpu", "rtx"] and deep["updates"] == 3 and deep["precision"] == "nf4"
    assert deep["peak_rss_bytes"] == 1050 * MIB and deep["estimate_bytes"] == 1200 * MIB
    assert abs(deep["estimate_error"] - (1200 - 1050) / 1050) < 1e-9
    assert deep["loss_first"] == (3.0 + 4.0) / 2 and deep["loss_last"] == (1.0 + 3.0) / 2  # first and last update per client
    assert deep["metric"]["value"] == 0.66
    bf16 = rows["L16-bf16"]
    assert bf16["clients"] == ["nano"] and bf16["tier"] == "L16" and bf16["precision"] == "bf16"
    assert bf16["peak_rss_bytes"] == 820 * MIB and bf16["metric"]["value"] == 0.61
    unused = rows["L16"]
    assert unused["clients"] == [] and unused["updates"] == 0 and unused["estimate_error"] is None


def test_the_summary_prints_the_tier_table_and_the_full_models_metric(tmp_path, capsys):
    _two_tier_report(tmp_path)
    render_summary(load_report(tmp_path))
    shown = capsys.readouterr().err
    assert "tiers (memory" in shown and "L16-bf16" in shown and "cpu, rtx" in shown and "+14.3%" in shown
    assert "full LLM + final adapter: accuracy 0.700" in shown
