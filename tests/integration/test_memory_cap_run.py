"""Clients playing device classes under real memory caps, in a real run (serve + join processes).

Three ``fedsoda-client join --profile CLASS --memory-limit SIZE`` processes on this machine,
against ``fedsoda-coordinator serve`` over a private mosquitto (the light fault-test run:
the 4-layer SmolLM2 cut as one NF4 tier, one short round):

* ``roomy`` plays cpu-8gb under 900 MiB: the coordinator plans against 900 MiB less the
  class's margin (not this machine's free RAM), and the client trains its round under the real
  cap, which is only about a quarter above the tier's estimate (710 MiB) and measured peak;
* ``starved`` plays cpu-8gb under 560 MiB (above what the process holds at start, below the
  tier): the coordinator refuses it with the numbers and the client exits with them (7);
* ``nano`` plays a Jetson Orin Nano under 2 GiB: its class runs no 4-bit, so the NF4 tier
  is refused, which only the class's flag (this machine runs 4-bit) can cause.

And, without any broker, a cap below what the process already uses stops ``join`` at once.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks.harness import Federation, light_settings
from hardware_profiles.profile import load_catalog
from shared.errors import InsufficientMemoryError
from shared.signing import SigningKey

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cap is Linux's RLIMIT_DATA"),
]

RUN_TIMEOUT = 240.0
MIB = 1 << 20


def test_capped_clients_are_planned_by_their_cap_and_class_and_train_under_it(tmp_path, broker_factory, tiny_model_dir, unique_id):
    broker = broker_factory("mosquitto")
    settings = light_settings(unique_id("cap"), tiny_model_dir, broker.port, rounds={"rounds": 1, "min_clients": 1})
    fed = Federation.create(tmp_path, broker, settings, ["roomy", "starved", "nano"])
    try:
        fed.serve()
        fed.join("roomy", "--profile", "cpu-8gb", "--memory-limit", "900MiB")
        fed.join("starved", "--profile", "cpu-8gb", "--memory-limit", "560MiB")
        fed.join("nano", "--profile", "jetson-orin-nano-8gb", "--memory-limit", "2GiB")
        report = fed.finish(RUN_TIMEOUT, clients=["roomy"])
        for name in ("starved", "nano"):
            fed.wait(lambda n=name: not fed.procs.running(n), f"{name} to stop", 60.0, watch=())
    finally:
        fed.procs.kill_all()

    roomy_log = fed.procs.log("roomy")
    assert "memory cap 900.00 MiB on the whole process (RLIMIT_DATA)" in roomy_log
    assert fed.outcome("roomy")["status"] == "finished" and fed.rounds_sent("roomy") == [1]
    margin = load_catalog().get("cpu-8gb").safety_margin
    assert report["assignments"]["roomy"]["budget_bytes"] == int(900 * MIB * (1 - margin))  # not this machine's RAM
    updates = [u for u in report["updates"] if u["client_id"] == "roomy"]
    assert updates and updates[0]["resources"]["device_class"] == "cpu-8gb"
    assert updates[0]["resources"]["peak_rss_bytes"] < 900 * MIB

    starved = fed.procs.procs["starved"]
    assert starved.returncode == InsufficientMemoryError.exit_code, fed.procs.log("starved")[-3000:]
    starved_log = " ".join(fed.procs.log("starved").split())  # rich may wrap the error line
    assert "error: the coordinator did not admit this device: no prepared tier fits" in starved_log
    assert "560.00 MiB available memory less 15% margin" in starved_log

    # Its offline presence tells the coordinator why it left.
    assert "starved is offline (failed: the coordinator did not admit this device" in " ".join(fed.procs.log("coordinator").split())

    nano = fed.procs.procs["nano"]
    assert nano.returncode == InsufficientMemoryError.exit_code, fed.procs.log("nano")[-3000:]
    assert "none runs on jetson-orin-nano-8gb" in " ".join(fed.procs.log("nano").split())


def test_join_with_a_cap_below_what_the_process_already_uses_stops_at_once_with_both_numbers(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    # Port 1 is never a broker: the refusal must come before any connection is tried.
    proc = subprocess.run(
        [sys.executable, "-m", "edge_client", "join", "--data", str(data), "--broker", "127.0.0.1:1",
         "--state-dir", str(tmp_path / "state"), "--memory-limit", "64MiB",
         "--coordinator-key", SigningKey.generate().public.text],
        capture_output=True, text=True, timeout=120,
    )
    said = " ".join(proc.stderr.split())
    assert proc.returncode == InsufficientMemoryError.exit_code, proc.stderr[-3000:]
    assert "error: memory cap of 64.00 MiB is below the " in said and "this process already uses" in said
