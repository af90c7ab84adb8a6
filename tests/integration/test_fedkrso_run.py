"""FedKRSO end to end, as a user runs it: ``fedsoda-coordinator simulate`` with ``method = "fedkrso"``.

Two real ``fedsoda-client join`` processes on the embedded broker train the 4-bit (NF4) full
model in the round's random subspaces. Checked from what the run left on disk, independently
of the code that produced it:

* each update holds exactly the round's seeds x every target matrix, ``d_out x r`` each: the
  coordinates, never a weight;
* each round's global state is the previous one plus the example-weighted mean of the
  round's coordinates (history is kept, not re-sent by clients);
* the exported adapter loads on the full model with PEFT and its update is exactly the
  rebuild of the final coordinates (:func:`shared.subspace.rebuild`);
* the full model was evaluated before and after.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from coordinator.model.models import load_model
from coordinator.model.update_forms import target_matrices
from shared.subspace import rebuild, round_seeds, split_key

RUN_TIMEOUT = 900
SEED, RANK, K = 3, 2, 3
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _config(path: Path, model_dir: Path) -> Path:
    path.write_text(f"""
run_id = "krso"
seed = {SEED}
method = "fedkrso"

[model]
model = "{model_dir}"
public_data = "wikipedia"
calibration_samples = 4
calibration_seq_len = 32

[pruning]
precision = "nf4"

[rounds]
rounds = 2
quorum = 2
round_timeout_s = 300.0

[training]
local_steps = 3
batch_size = 2
seq_len = 64
target_modules = {json.dumps(TARGETS)}

[subspace]
rank = {RANK}
seeds_per_round = {K}

[evaluation]
test_samples = 8
tiers = false
max_length = 96
""")
    return path


def test_fedkrso_trains_coordinates_averages_them_and_exports_the_rebuilt_update(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "simulate", "--config", str(_config(tmp_path / "run.toml", tiny_model_dir)),
         "--clients", "2", "--examples-per-client", "10", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    report = json.loads((run_dir / "report.json").read_text())
    assert report["method"] == "fedkrso"
    assert [r["outcome"] for r in report["rounds"]] == ["aggregated", "aggregated"]
    (tier,) = report["tiers"].values()
    assert tier["layers"] == 4  # the whole model, no pruning

    full, _ = load_model(tiny_model_dir)
    matrices = target_matrices(full, TARGETS)
    previous = load_file(str(run_dir / "global" / "round_0000.safetensors"))
    assert previous == {}  # FedKRSO starts from the base model: no coordinates yet
    for r in (1, 2):
        seeds = set(round_seeds(SEED, r, K))
        folder = run_dir / "updates" / f"round_{r:04d}"
        metas = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
        assert sorted(m["client_id"] for m in metas) == ["client-0", "client-1"]
        deltas = [(m["num_examples"], load_file(str(folder / m["tensors"]))) for m in metas]
        for _n, delta in deltas:
            assert {split_key(k) for k in delta} == {(m, s) for m in matrices for s in seeds}
            for key, value in delta.items():
                assert tuple(value.shape) == (matrices[split_key(key)[0]][0], RANK)
            assert any(bool(v.abs().sum() > 0) for v in delta.values())  # it trained
        saved = load_file(str(run_dir / "global" / f"round_{r:04d}.safetensors"))
        assert set(saved) == set(previous) | set(deltas[0][1])  # history kept, the round's seeds added
        total = sum(n for n, _ in deltas)
        for key, value in saved.items():
            want = previous[key] if key in previous else sum(n / total * d[key].float() for n, d in deltas)
            assert torch.allclose(value.float(), want.float(), rtol=1e-5, atol=1e-8), (r, key)
        previous = saved

    # The export: a PEFT LoRA folder whose update on every target matrix is the rebuilt one.
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(full, str(run_dir / "adapter"))
    dense = rebuild(previous, lambda m: matrices[m][1])
    assert set(dense) == set(matrices)
    for module, update in dense.items():
        lora = adapted.get_submodule(module)
        got = lora.get_delta_weight("default")
        assert torch.allclose(got, update, atol=1e-6), module

    evaluation = json.loads((run_dir / "evaluation.json").read_text())["evaluation"]
    assert evaluation["test_examples"] == 8 and "before" in evaluation and "after" in evaluation
