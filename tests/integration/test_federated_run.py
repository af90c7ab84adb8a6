"""A whole federated run over real mosquitto with real processes and the real (cut) SmolLM2.

What a user would do, end to end: ``fedsoda-coordinator serve`` and three
``fedsoda-client join`` processes. Along the way one client is killed mid-round (its Last
Will marks it offline and the round closes without it), another joins late, and the
coordinator itself is killed after accepting an update and restarted with ``--resume``.
Every wait is bounded and driven by progress (files, retained MQTT messages), never by a
bare sleep.
"""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks.harness import Processes, check_ledger, wait_until, write_rows
from coordinator.model.datasets import movie_reviews, train_test_split
from shared.signing import load_or_create_signing_key
from tests.runlib import ScheduleWatch

pytestmark = pytest.mark.integration

RUN_TIMEOUT = 600.0


def _config(path: Path, run_id: str, model_dir: Path, port: int) -> Path:
    path.write_text(f"""
run_id = "{run_id}"
seed = 1
method = "fedsoda"

[model]
model = "{model_dir}"
public_data = "wikipedia"
calibration_samples = 8
calibration_seq_len = 32

[pruning]
depths = [4]

[alignment]
pre_align_steps = 2
realign_steps = 1
batch_size = 4

[rounds]
rounds = 3
min_clients = 2
quorum = 1
round_timeout_s = 60.0
max_extensions = 10
realign_every = 2

[training]
local_steps = 3
learning_rate = 0.002
batch_size = 2
seq_len = 32
lora_rank = 4
lora_alpha = 8.0
lora_dropout = 0.0
target_modules = ["q_proj", "v_proj"]
mu = 0.01
seed = 0

[task]
preset = "rotten_tomatoes"

[evaluation]
test_samples = 8
every_rounds = 2
round_samples = 4

[broker]
host = "127.0.0.1"
port = {port}
""")
    return path


def test_three_clients_dropout_late_join_and_coordinator_resume(tmp_path, mosquitto_broker, small_model_dir, unique_id):
    run_id = unique_id("it")
    run_dir = tmp_path / "run"
    config = _config(tmp_path / "run.toml", run_id, small_model_dir, mosquitto_broker.port)
    train, _ = train_test_split(movie_reviews("rotten_tomatoes"), seed=0)
    data = {name: write_rows(tmp_path / name / "data.jsonl", train[i * 40:(i + 1) * 40]) for i, name in enumerate(["alice", "bob", "carol"])}
    procs = Processes(tmp_path)
    serve = ["-m", "coordinator", "serve", "--config", str(config), "--run-dir", str(run_dir)]
    # The key serve uses by default (coordinator.key in the run directory), made first so the
    # clients can pin its coordinator.pub before the coordinator has started.
    pinned = load_or_create_signing_key(run_dir / "coordinator.key").public.text

    def join(name: str) -> subprocess.Popen:
        return procs.start(name, [
            "-m", "edge_client", "join", "--broker", f"127.0.0.1:{mosquitto_broker.port}", "--run", run_id,
            "--client-id", name, "--data", str(data[name]), "--state-dir", str(tmp_path / name / "state"),
            "--coordinator-key", pinned, "--json",
        ])

    watch = ScheduleWatch(mosquitto_broker.port, run_id)
    updates = lambda r: sorted(p.name for p in (run_dir / "updates" / f"round_{r:04d}").glob("*.json"))  # noqa: E731
    try:
        procs.start("coordinator", serve)
        join("alice")
        join("bob")
        # Round 2: kill bob mid-round (after the schedule names him, before he reports). His
        # Last Will marks him offline, so the round closes on alice's report alone.
        wait_until(lambda: watch.running(2) and "bob" in watch.latest.participants, "round 2 running with bob", RUN_TIMEOUT, procs)
        procs.procs["bob"].send_signal(signal.SIGKILL)
        # Carol joins late: after rounds 1 and 2 were scheduled without her.
        join("carol")
        wait_until(lambda: (run_dir / "global" / "round_0002.safetensors").exists(), "round 2 aggregated without bob", RUN_TIMEOUT, procs)
        # Round 3: kill the coordinator once it has accepted (persisted) at least one update.
        wait_until(lambda: len(updates(3)) >= 1, "an accepted round-3 update", RUN_TIMEOUT, procs)
        accepted_before_kill = updates(3)
        procs.procs["coordinator"].send_signal(signal.SIGKILL)
        procs.procs["coordinator"].wait(timeout=30)
        procs.start("coordinator", [*serve, "--resume"])
        wait_until(lambda: procs.procs["coordinator"].poll() is not None, "the resumed run to finish", RUN_TIMEOUT, procs, watch=())
        assert procs.procs["coordinator"].returncode == 0, procs.log("coordinator")[-4000:]
        for name in ("alice", "carol"):
            procs.procs[name].wait(timeout=120)
            assert procs.procs[name].returncode == 0, procs.log(name)[-4000:]
    finally:
        watch.close()
        procs.kill_all()

    report = json.loads((run_dir / "report.json").read_text())
    # Every client signed what it sent with the key its first hello brought, across the coordinator's restart.
    pinned_keys = json.loads((run_dir / "client_keys.json").read_text())
    assert sorted(pinned_keys) == ["alice", "bob", "carol"] and len(set(pinned_keys.values())) == 3
    assert "SignatureError" not in report["refused"], report["refused"]
    rounds = {r["round"]: r for r in report["rounds"]}
    assert sorted(rounds) == [1, 2, 3]
    assert sorted(rounds[1]["reported"]) == ["alice", "bob"]
    assert sorted(rounds[2]["participants"]) == ["alice", "bob"]
    assert rounds[2]["reported"] == ["alice"] and rounds[2]["dropouts"] == 1
    assert sorted(rounds[3]["participants"]) == ["alice", "carol"]
    assert sorted(rounds[3]["reported"]) == ["alice", "carol"]
    # No accepted update was lost across the coordinator's crash, and none counted twice.
    assert set(accepted_before_kill) <= set(updates(3))
    assert len(updates(3)) == 2
    # Each round's global adapter is FedAvg of exactly its accepted updates, each once.
    check_ledger(run_dir, {(3, name.removesuffix(".json")) for name in accepted_before_kill})
    assert all(r["outcome"] == "aggregated" for r in report["rounds"])

    # The global adapter changed every round.
    globals_ = [load_file(str(run_dir / "global" / f"round_{r:04d}.safetensors")) for r in range(4)]
    for before, after in zip(globals_, globals_[1:]):
        assert any(not torch.equal(before[k], after[k]) for k in before)

    # The sub-LLM was re-aligned after round 2 (version 2), which clients fetched.
    assert report["tiers"]["L4"]["version"] == 2

    # The final adapter loads on the full model with PEFT, every tensor on its full-LLM layer.
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from coordinator.model.models import load_model

    full, _ = load_model(small_model_dir)
    peft_model = PeftModel.from_pretrained(full, str(run_dir / "adapter"))
    loaded = get_peft_model_state_dict(peft_model)
    final = globals_[3]
    assert set(loaded) == set(final)
    for key, value in final.items():
        assert torch.allclose(loaded[key].float(), value), key
    evaluation = report["results"]["evaluation"]
    assert evaluation["test_examples"] == 8 and evaluation["task"] == "rotten_tomatoes" and evaluation["metric"] == "accuracy"
    for key in ("before", "after"):
        assert evaluation[key]["n"] == 8 and evaluation[key]["low"] <= evaluation[key]["value"] <= evaluation[key]["high"]
    assert set(evaluation["tiers"]) == {"L4"} and evaluation["difference"]["n"] == 8
    # The per-round curve: the global adapter every 2 rounds on the first 4 test rows (round 2
    # was evaluated before the crash and stays in the resumed run's report).
    assert [(r["round"], r["n"]) for r in report["round_evaluations"]] == [(2, 4)]
