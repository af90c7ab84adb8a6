"""``prune`` once, then ``serve --tiers`` on its output: no SGP or pre-alignment, trained to the end.

Real processes on a real mosquitto: ``fedsoda-coordinator prune`` on the 4-layer SmolLM2 cut,
then ``serve`` with ``pruning.tiers_dir`` set to the prune folder and two ``join`` clients.
The coordinator adopts the tiers as they are (the manifests clients download are the prune
output's), re-aligns them once from the aligned weights prune kept, exports the adapter, and
every accepted update is in the aggregate once.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.harness import Federation, check_ledger, light_settings
from coordinator.model.datasets import public_text
from coordinator.model.tierset import load_tiers

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 600.0


def test_serve_reuses_a_prune_output_without_pruning_again(tmp_path, mosquitto_broker, tiny_model_dir, unique_id):
    public = tmp_path / "public.jsonl"
    public.write_text("".join(json.dumps({"text": t}) + "\n" for t in public_text("wikipedia", n=10)))
    pruned = tmp_path / "pruned"
    prune = subprocess.run(
        [sys.executable, "-m", "coordinator", "prune", "--model", str(tiny_model_dir), "--public-data", str(public),
         "--out", str(pruned), "--block-size", "1", "--depths", "3", "--calib-samples", "6", "--eval-samples", "4",
         "--seq-len", "16", "--oda-steps", "1", "--align-layers", "all"],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert prune.returncode == 0, prune.stdout + prune.stderr
    shown = prune.stderr  # the console (not a terminal here): one line per long step as it goes
    assert "SGP: block distances" in shown and "ODA: aligning tier L3" in shown
    assert f"serve --tiers {pruned}" in shown
    built = load_tiers(pruned)

    settings = light_settings(
        unique_id("reuse"), tiny_model_dir, mosquitto_broker.port,
        pruning={"tiers_dir": str(pruned)},
        alignment={"realign_steps": 1, "batch_size": 2},
        rounds={"rounds": 2, "min_clients": 2, "quorum": 2, "realign_every": 1},
    )
    settings["method"] = "fedsoda"
    (tmp_path / "fed").mkdir()
    fed = Federation.create(tmp_path / "fed", mosquitto_broker, settings, ["a", "b"])
    try:
        fed.serve()
        fed.join("a")
        fed.join("b")
        report = fed.finish(RUN_TIMEOUT)
    finally:
        fed.procs.kill_all()

    log = fed.procs.log("coordinator")
    assert f"reusing the fedsoda tiers prepared in {pruned}" in log
    assert "SGP:" not in log and "ODA: aligning" not in log, "serve pruned or pre-aligned again"
    assert "ODA: re-aligning tier L3" in log  # from the aligned weights prune kept
    record = json.loads((fed.run_dir / "tiers.json").read_text())
    assert record["source"] == str(pruned.resolve())
    assert record["tiers"]["L3"] == {"kept": built.tiers["L3"].kept, "version": 2, "precision": "nf4"}
    assert report["phase"] == "finished" and report["method"] == "fedsoda"
    assert {c["tier"] for c in report["clients"].values()} == {"L3"}
    assert [r["outcome"] for r in report["rounds"]] == ["aggregated", "aggregated"]
    assert (fed.run_dir / "adapter" / "adapter_config.json").is_file()
    check_ledger(fed.run_dir)
    # Round 1 trained on exactly the package prune wrote.
    v1 = fed.run_dir / "tiers" / "L3" / "v1"
    assert sorted(p.name for p in v1.iterdir()) == sorted(p.name for p in built.tiers["L3"].folder.iterdir())
