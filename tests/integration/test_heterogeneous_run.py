"""A heterogeneous federation, as a user runs it: ``fedsoda-coordinator simulate --profiles``.

Three client processes play three device classes on this machine, each under a real memory
cap (RLIMIT_DATA), against the real coordinator (SGP + ODA on the 6-layer SmolLM2 cut, tiers
L2 and L5 in nf4):

* a CPU box whose cap (derived below from the estimator) fits only the shallow tier;
* a Jetson Orin Nano, whose class has no 4-bit kernels: ``simulate`` publishes every tier in
  bf16 too, and the Nano trains ``L5-bf16``;
* an RTX 3060 under 2 GiB: the deep tier in nf4.

What is checked: every client got the tier the estimator says fits its cap, and trained
it under the cap; each round's global adapter is FedAvg *per key over that key's holders*
(recomputed here by hand from the persisted updates, independently of the aggregation code):
a layer only the deep tier holds is averaged over the deep clients alone; the exported
adapter loads on the full model with PEFT; the report has a row per tier with its measured
peak next to the plan's estimate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator.model.models import load_model
from hardware_profiles.assignment import PublishedPackage, assign_tier
from hardware_profiles.detect import emulated_profile
from hardware_profiles.memory import describe_bytes
from shared.protocol import TrainingParams

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the caps are Linux's RLIMIT_DATA"),
]

MIB = 1 << 20
RUN_TIMEOUT = 900
DEPTHS = (2, 5)
TRAINING = TrainingParams(local_steps=2, learning_rate=0.002, batch_size=2, seq_len=64, lora_rank=4, lora_alpha=8.0,
                          lora_dropout=0.0, target_modules=["q_proj", "v_proj"], mu=0.01, seed=0)


def _config(path: Path, model_dir: Path) -> Path:
    t = TRAINING
    path.write_text(f"""
run_id = "hetero"
seed = 1
method = "fedsoda"

[model]
model = "{model_dir}"
public_data = "wikipedia"
calibration_samples = 6
calibration_seq_len = 32

[pruning]
depths = {list(DEPTHS)}
precision = "nf4"

[alignment]
pre_align_steps = 1
realign_steps = 1
batch_size = 2

[rounds]
rounds = 2
quorum = 3
round_timeout_s = 300.0
max_extensions = 4
realign_every = 1

[training]
local_steps = {t.local_steps}
learning_rate = {t.learning_rate}
batch_size = {t.batch_size}
seq_len = {t.seq_len}
lora_rank = {t.lora_rank}
lora_alpha = {t.lora_alpha}
lora_dropout = 0.0
target_modules = {json.dumps(t.target_modules)}

[evaluation]
test_samples = 8
tiers = false
max_length = 96
""")
    return path


def _planned(model_config: dict, device_class: str, cap: int) -> str:
    """The package the coordinator assigns a class under ``cap``: the estimate depends on the
    number of kept layers, not on which, so placeholders of the published depths do."""
    packages = {}
    for depth in DEPTHS:
        packages[f"L{depth}"] = PublishedPackage(tuple(range(depth)), "nf4")
        packages[f"L{depth}-bf16"] = PublishedPackage(tuple(range(depth)), "bf16")
    assignment = assign_tier("probe", emulated_profile(cap, device_class=device_class), model_config, packages, TRAINING)
    return assignment.tier if assignment.accepted else ""


def _shallow_cap(model_config: dict) -> int:
    """A cpu-8gb cap that fits the shallow tier but no package of the deep one, mid-way
    between the smallest cap of each (found from the real estimator, 4 MiB steps)."""
    smallest: dict[str, int] = {}
    for mib in range(400, 4096, 4):
        tier = _planned(model_config, "cpu-8gb", mib * MIB)
        if tier:
            smallest.setdefault(tier.split("-")[0], mib)
        if "L5" in smallest:
            break
    assert set(smallest) == {"L2", "L5"}, smallest
    assert smallest["L5"] - smallest["L2"] >= 16, f"the tiers' estimates are too close to tell apart: {smallest}"
    return (smallest["L2"] + smallest["L5"]) // 2 * MIB


def test_three_device_classes_train_their_tiers_and_one_adapter_is_averaged_per_key(tmp_path, small_model_dir):
    model_config = json.loads((small_model_dir / "config.json").read_text())
    cap = _shallow_cap(model_config)
    played = {"client-0": ("cpu-8gb", cap), "client-1": ("jetson-orin-nano-8gb", 2048 * MIB), "client-2": ("rtx-3060-12gb", 2048 * MIB)}
    expected = {name: _planned(model_config, cls, limit) for name, (cls, limit) in played.items()}
    assert expected["client-0"].startswith("L2") and expected["client-1"] == "L5-bf16" and expected["client-2"] == "L5"

    run_dir = tmp_path / "run"
    profiles = ",".join(f"{cls}:{limit // MIB}MiB" for cls, limit in played.values())
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "simulate", "--config", str(_config(tmp_path / "run.toml", small_model_dir)),
         "--clients", "3", "--examples-per-client", "12", "--profiles", profiles, "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    shown = " ".join((result.stdout + result.stderr).split())
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    assert "jetson-orin-nano-8gb cannot run nf4 packages: every tier is also published in bf16" in shown

    report = json.loads((run_dir / "report.json").read_text())
    assert sorted(report["tiers"]) == ["L2", "L2-bf16", "L5", "L5-bf16"]
    assigned = {name: a["tier"] for name, a in report["assignments"].items()}
    assert assigned == expected
    assert len({report["tiers"][t]["layers"] for t in assigned.values()}) == 2  # both depths train
    # Re-aligned after round 1: every package of every tier is at version 2, and clients trained it.
    assert {t["version"] for t in report["tiers"].values()} == {2}
    assert "ODA: re-aligning tier L2" in shown and "ODA: re-aligning tier L5" in shown

    # Every client trained every round under its cap, and said which class it played.
    rounds = report["rounds"]
    assert [r["outcome"] for r in rounds] == ["aggregated", "aggregated"]
    for r in rounds:
        assert r["reported"] == sorted(played)
    for update in report["updates"]:
        cls, _limit = played[update["client_id"]]
        assert update["resources"]["device_class"] == cls and update["resources"]["peak_rss_bytes"] > 0
    # The cap bounds VmData (RLIMIT_DATA); the RSS also counts mapped library and weight files,
    # so it may pass the cap a little: the proof that each client trained under it is its log.
    outcomes = {c["client_id"]: c for c in json.loads((run_dir / "clients.json").read_text())}
    for name, (_cls, limit) in played.items():
        assert outcomes[name]["status"] == "finished"
        log = (run_dir / "clients" / name / "client.log").read_text()
        assert f"memory cap {describe_bytes(limit)} on the whole process (RLIMIT_DATA)" in " ".join(log.split())

    # FedAvg per key over its holders, recomputed by hand from what was persisted.
    previous = load_file(str(run_dir / "global" / "round_0000.safetensors"))
    deep_only = 0
    for r in (1, 2):
        folder = run_dir / "updates" / f"round_{r:04d}"
        metas = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        assert sorted(m["client_id"] for m in metas) == sorted(played)  # each accepted update once
        deltas = {m["client_id"]: (m["num_examples"], load_file(str(folder / m["tensors"]))) for m in metas}
        saved = load_file(str(run_dir / "global" / f"round_{r:04d}.safetensors"))
        assert set(saved) == set(previous)
        for key, value in saved.items():
            holders = [(n, d[key]) for n, d in deltas.values() if key in d]
            total = sum(n for n, _ in holders)
            want = previous[key].float() + sum((n / total) * d.float() for n, d in holders) if holders else previous[key].float()
            assert torch.allclose(value.float(), want, rtol=1e-5, atol=1e-7), (r, key)
            deep_only += 0 < len(holders) < len(deltas)
        shallow = deltas["client-0"][1]
        assert set(shallow) < set(deltas["client-2"][1])  # the shallow tier holds a subset of the layers
        previous = saved
    assert deep_only > 0  # some keys were averaged over the deep clients alone

    # The exported adapter loads on the full model with PEFT and is the last global adapter.
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    full, _ = load_model(small_model_dir)
    loaded = get_peft_model_state_dict(PeftModel.from_pretrained(full, str(run_dir / "adapter")))
    assert set(loaded) == set(previous)
    # It covers the union of the layers the tiers keep (the deep tier's, which nest the shallow one's).
    kept = json.loads((run_dir / "tiers.json").read_text())["tiers"]
    assert set(kept["L2"]["kept"]) < set(kept["L5"]["kept"])
    layers = {int(key.split(".layers.")[1].split(".")[0]) for key in loaded}
    assert layers == set(kept["L5"]["kept"]) | set(kept["L2"]["kept"])
    for key, value in previous.items():
        assert torch.allclose(loaded[key].float(), value.float()), key

    # The report's tier table: one row per assigned package, measured peak beside the estimate.
    from coordinator.run.reports import load_report
    from coordinator.run.tier_report import tier_rows

    rows = {row["package"]: row for row in tier_rows(load_report(run_dir))}
    assert set(rows) >= set(assigned.values())
    for name in assigned.values():
        assert rows[name]["clients"] and rows[name]["updates"] == 2 * len(rows[name]["clients"])
        assert 0 < rows[name]["peak_rss_bytes"] and 0 < rows[name]["estimate_bytes"] and rows[name]["estimate_error"] is not None
