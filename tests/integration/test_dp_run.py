"""DP-FedAvg end to end, as a user runs it: ``simulate`` with ``[privacy] enabled = true``.

Two real ``fedsoda-client join`` processes on the embedded broker train the 4-layer cut of
SmolLM2 (FedPETuning) for two rounds. Checked from what the run left on disk:

* every update the coordinator received was clipped and noised by its client: its norm is
  that of a delta of norm at most ``clip_norm`` plus Gaussian noise of ``z C / sqrt(n)`` per
  coordinate (the bound is small enough that every trained delta is clipped);
* each round is averaged with equal weights (the run audit recomputes every aggregate);
* ``report.json`` gives the privacy budget, which matches the closed form of Renyi DP
  composition computed here independently.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import check_ledger
from coordinator.run.checkpoint import RunDir

RUN_TIMEOUT = 900
CLIP, Z, DELTA, CLIENTS = 0.05, 0.01, 1e-5, 2


def _config(path: Path, model_dir: Path) -> Path:
    path.write_text(f"""
run_id = "dp"
method = "fedpetuning"

[model]
model = "{model_dir}"

[pruning]
precision = "nf4"

[rounds]
rounds = 2
quorum = {CLIENTS}
round_timeout_s = 300.0

[training]
local_steps = 3
batch_size = 2
seq_len = 48

[privacy]
enabled = true
clip_norm = {CLIP}
noise_multiplier = {Z}
delta = {DELTA}

[evaluation]
enabled = false
""")
    return path


def _epsilon(z: float, rounds: int, delta: float) -> float:
    # min over alpha of rounds * alpha / (2 z^2) + log(1/delta) / (alpha - 1), on a fine grid
    return min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1) for a in (1 + i / 1000 for i in range(1, 2_000_000)))


def test_clients_clip_and_noise_their_deltas_and_the_report_gives_the_budget(tmp_path, tiny_model_dir) -> None:
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "coordinator", "simulate", "--config", str(_config(tmp_path / "run.toml", tiny_model_dir)),
         "--clients", str(CLIENTS), "--examples-per-client", "10", "--run-dir", str(run_dir)],
        capture_output=True, text=True, timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    check_ledger(run_dir)  # every aggregate is the equal-weight aggregate of its updates
    report = json.loads((run_dir / "report.json").read_text())
    assert report["aggregation_settings"]["uniform_weights"] is True

    std = Z * CLIP / math.sqrt(CLIENTS)
    run = RunDir(run_dir)
    for r in (1, 2):
        updates = run.updates(r)
        assert len(updates) == CLIENTS
        for u in updates:
            delta = u.load_delta()
            d = sum(t.numel() for t in delta.values())
            norm = math.sqrt(sum(float(t.double().square().sum()) for t in delta.values()))
            # clipped to CLIP, then noise of norm ~ std * sqrt(d) (concentrated: d is ~60k)
            assert 0.97 * std * math.sqrt(d) <= norm <= 1.03 * math.sqrt(CLIP**2 + d * std * std), (r, u.client_id, norm)
        influence = run.load_influence(r)
        assert influence is not None and {c.weight for c in influence.clients} == {1.0}

    privacy = report["results"]["privacy"]
    assert privacy["rounds"] == 2 and privacy["clip_norm"] == CLIP and privacy["delta"] == DELTA
    assert privacy["noise_multiplier_aggregate"] == Z  # both clients reported in both rounds
    assert math.isclose(privacy["epsilon_aggregate"], _epsilon(Z, 2, DELTA), rel_tol=1e-4)
    assert math.isclose(privacy["noise_multiplier_coordinator"], Z / math.sqrt(CLIENTS))
    assert privacy["epsilon_coordinator"] > privacy["epsilon_aggregate"]
