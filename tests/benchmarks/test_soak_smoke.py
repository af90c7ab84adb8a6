"""Smoke test of benchmarks/soak.py: its quick mode (2 rounds, 3 client processes, one broker
SIGKILL while round 1 runs) finishes, audits clean and writes its results.

No timing is asserted: the machine running the tests may be busy.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import soak

pytestmark = pytest.mark.integration


def test_quick_soak_survives_its_fault_and_writes_results(tmp_path):
    result = soak.main(["--quick", "--out-dir", str(tmp_path)])
    for name in ("soak.json", "soak.md", "soak.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["quick"] is True and saved["finished"] is True
    assert saved["rounds_completed"] == 2
    assert saved["faults_injected"] == 1 and saved["faults_by_kind"] == {"client": 0, "broker": 1}
    assert saved["faults"][0]["round"] == 1
    assert saved["updates_accepted"] >= 2  # quorum 1 of 3 clients, two rounds
    assert saved["updates_lost"] == 0 and saved["updates_counted_twice"] == 0 and saved["problems"] == []
    assert saved["progress"][-1][1] == 2
    assert "| updates lost" in (tmp_path / "soak.md").read_text()
