"""Smoke test of benchmarks/paper.py: the three methods run through the real ``simulate``
(embedded broker, client processes) on a 6-layer cut of SmolLM2 in quick mode, and the
benchmark's numbers are the ones the run directories hold. One ``--set`` rides along (LoRA rank
4 instead of the preset's 8), so the same runs show that an override reaches every run.

No accuracy or timing is asserted (2 rounds x 2 steps teach nothing; the machine may be busy).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import paper


def _quick_args(model_dir, out):
    return [
        "--quick", "--model", str(model_dir), "--tasks", "rotten_tomatoes", "--seeds", "0",
        "--clients", "2", "--examples-per-client", "16", "--out-dir", str(out),
        "--work-dir", str(out / "runs"), "--set", "training.lora_rank=4",
    ]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, small_model_dir):
    out = tmp_path_factory.mktemp("paper")
    return out, paper.main(_quick_args(small_model_dir, out))


def test_quick_run_writes_results_for_every_method(quick_run):
    out, summary = quick_run
    for name in ("paper.json", "paper.md", "paper.png"):
        assert (out / name).stat().st_size > 0
    rows = summary["rotten_tomatoes"]["methods"]
    assert set(rows) == {"fedsoda", "fedot", "fedpetuning"}
    # fedsoda and fedot clients hold a 4-layer sub-LLM, fedpetuning clients the whole 6 layers.
    assert rows["fedsoda"]["layers"] == rows["fedot"]["layers"] == [4]
    assert rows["fedpetuning"]["layers"] == [6]
    assert rows["fedsoda"]["storage_bytes"] < rows["fedpetuning"]["storage_bytes"]
    # (No traffic comparison: on a 6-layer model the embedding table dominates the download and
    # fedsoda's re-aligned versions can outweigh the 2 layers it saves.)
    headline = summary["rotten_tomatoes"]["headline"]
    assert set(headline) == set(paper.TARGETS)


def test_bytes_and_accuracy_come_from_the_run_directories(quick_run):
    out, _ = quick_run
    saved = json.loads((out / "paper.json").read_text())
    for run in saved["runs"]:
        run_dir = out / "runs" / run["overrides"]["run_id"]
        outcomes = json.loads((run_dir / "clients.json").read_text())
        assert run["bytes_per_client"] == sum(c["bytes_received"] + c["bytes_sent"] for c in outcomes) / len(outcomes)
        assert run["bytes_per_client"] > run["storage_bytes"] > 0  # a client downloads at least its package
        evaluation = json.loads((run_dir / "evaluation.json").read_text())
        assert run["accuracy_after"] == evaluation["evaluation"]["after"]["value"]
        assert run["test_examples"] == 16
        # Only fedsoda re-aligns (quick mode re-aligns after round 1): the others keep version 1.
        report = json.loads((run_dir / "report.json").read_text())
        versions = {tier["version"] for tier in report["tiers"].values()}
        assert versions == ({2} if run["overrides"]["method"] == "fedsoda" else {1}), run["overrides"]["method"]


def test_a_second_invocation_reuses_finished_runs(quick_run, small_model_dir, capsys):
    out, summary = quick_run
    again = paper.main(_quick_args(small_model_dir, out))
    assert capsys.readouterr().out.count("reusing") == 3
    assert again == summary


def test_set_overrides_every_run_and_is_checked(quick_run, tmp_path, capsys):
    assert paper.parse_setting("rounds.realign_every=0") == ("rounds.realign_every", 0)
    assert paper.parse_setting("alignment.align_layers=bridge") == ("alignment.align_layers", "bridge")
    with pytest.raises(SystemExit):
        paper.main(["--set", "rounds.realign_evry=0", "--out-dir", str(tmp_path)])
    assert "rounds.realign_evry: unknown option" in capsys.readouterr().err
    out, _ = quick_run
    saved = json.loads((out / "paper.json").read_text())
    assert saved["meta"]["settings"] == {"training.lora_rank": 4}
    assert len(saved["runs"]) == 3
    for run in saved["runs"]:
        assert run["overrides"]["training.lora_rank"] == 4
        # The override reached the run itself: the exported adapter has rank 4.
        adapter = json.loads((out / "runs" / run["overrides"]["run_id"] / "adapter" / "adapter_config.json").read_text())
        assert adapter["r"] == 4
    assert "Ablation: `training.lora_rank = 4`." in (out / "paper.md").read_text()
