"""`fedsoda-client probe` and `fedsoda-coordinator profiles` through Typer's CliRunner.

The RTX 3060 machine is faked (psutil / torch.cuda monkeypatched); the CPU runs are real.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from coordinator.cli import app as coordinator_app
from edge_client.cli import app as client_app

runner = CliRunner()


def test_probe_json_on_this_machine() -> None:
    result = runner.invoke(client_app, ["probe", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["profile"]["accelerator"] == "cpu"
    assert {p["name"] for p in data["probes"]} == {"memory", "cpu", "cuda", "jetson"}
    assert data["plan"] is None and data["model"] is None
    assert data["budget"]["bytes"] > 0


def test_probe_plans_a_model_on_a_faked_rtx_3060(rtx3060_box: Path, tiny_model_dir: Path, tmp_path: Path) -> None:
    # This machine has no Jetson files under /, so only psutil and torch.cuda need faking.
    ranking = tmp_path / "ranking.json"
    ranking.write_text(json.dumps({"ranking": [{"layers": [2], "distance": 0.1}, {"layers": [1], "distance": 0.2}]}))
    result = runner.invoke(client_app, ["probe", "--json", "--model", str(tiny_model_dir), "--ranking", str(ranking), "--seq-len", "128"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["device_class"] == "rtx-3060-12gb"
    plan = data["plan"]
    assert plan["precision"] == "nf4" and plan["keep_layers"] == [0, 1, 2, 3] and plan["seq_len"] == 128
    assert plan["estimate_bytes"] <= plan["budget_bytes"]


def test_probe_table_and_does_not_fit_exit_code(tiny_model_dir: Path) -> None:
    ok = runner.invoke(client_app, ["probe", "--model", str(tiny_model_dir)])
    assert ok.exit_code == 0 and "training plan" in ok.output and "tier" in ok.output
    # 200k tokens per step cannot fit a CPU box's RAM: the reason is shown, exit code 7.
    too_big = runner.invoke(client_app, ["probe", "--model", str(tiny_model_dir), "--batch-size", "64", "--seq-len", "4096", "--json"])
    assert too_big.exit_code == 7
    data = json.loads(too_big.stdout)
    assert data["plan"] is None and "needs" in data["plan_error"]


def test_probe_rejects_an_unknown_profile_name() -> None:
    result = runner.invoke(client_app, ["probe", "--profile", "cray-1"])
    assert result.exit_code == 2
    assert "cray-1" in result.output


def test_profiles_lists_the_catalog() -> None:
    result = runner.invoke(coordinator_app, ["profiles", "--json"])
    assert result.exit_code == 0, result.output
    names = [c["name"] for c in json.loads(result.stdout)["classes"]]
    assert "jetson-orin-nano-8gb" in names and "rtx-3060-12gb" in names and len(names) >= 12
    table = runner.invoke(coordinator_app, ["profiles"])
    assert table.exit_code == 0 and "device catalog" in table.output and "GiB" in table.output


def test_profiles_with_a_model_shows_nested_plans(tiny_model_dir: Path) -> None:
    result = runner.invoke(coordinator_app, ["profiles", "--json", "--model", str(tiny_model_dir), "--seq-len", "256"])
    assert result.exit_code == 0, result.output
    plans = json.loads(result.stdout)["plans"]
    kept = sorted((set(p["keep_layers"]) for p in plans.values() if isinstance(p, dict)), key=len)
    assert kept and all(a <= b for a, b in zip(kept, kept[1:]))


def test_profiles_reports_a_broken_extra_catalog(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text("name = 'bad'\nmemory_gib = 'lots'\n")
    result = runner.invoke(coordinator_app, ["profiles", "--catalog", str(tmp_path)])
    assert result.exit_code == 2
    assert "bad.toml" in result.output
