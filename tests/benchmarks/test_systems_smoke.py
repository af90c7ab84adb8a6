"""Smoke test of benchmarks/systems.py: its quick mode runs end to end and writes its
results, and FedAvg over the benchmark's generated deltas is the weighted average.

No timing is asserted: the machine running the tests may be busy.
"""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import systems
from coordinator.run.aggregation import get_strategy


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("systems")
    return out, systems.main(["--quick", "--out-dir", str(out)])


def test_quick_run_writes_results(quick_run):
    out, result = quick_run
    for name in ("systems.json", "systems.md", "systems.png"):
        assert (out / name).stat().st_size > 0
    saved = json.loads((out / "systems.json").read_text())
    assert saved["quick"] is True
    assert {"cpu_count", "torch"} <= set(saved["machine"])
    assert saved["adapter"]["keys"] == 72  # r=8 on q_proj/v_proj (A and B) over 18 layers
    agg = saved["aggregation"]
    for field in ("memcpy_s", "strategy_s", "persisted_s", "strategy_ratio", "persisted_ratio", "total_bytes"):
        assert agg[field] > 0
    assert agg["total_bytes"] == agg["n_clients"] * agg["delta_bytes"]
    mem = saved["memory"]
    assert mem["n_clients"] == [10, 50]
    for path in ("strategy", "persisted"):
        assert len(mem[f"{path}_growth_bytes"]) == 2
        assert isinstance(mem[f"{path}_slope_bytes_per_client"], float)
    fp32 = saved["client"]["fp32"]
    assert fp32["ratio"] > 0 and fp32["client_median"] > 0 and fp32["bare_median"] > 0
    assert set(saved["client"]["extra_work"]) == {"make_batch_s", "proximal_term_fwd_bwd_s", "clip_grad_norm_s"}
    assert "| fp32 |" in (out / "systems.md").read_text()


def test_fedavg_over_generated_deltas_is_the_weighted_average(quick_run):
    _, result = quick_run
    shapes = {k: tuple(v) for k, v in result["adapter"]["shapes"].items()}
    n_clients = 12
    start = systems.global_state(shapes)
    out = get_strategy("fedavg").aggregate(start, systems.delta_stream(shapes, n_clients))
    weights = [systems.client_examples(c) for c in range(n_clients)]
    assert len(set(weights)) > 1  # a real weighting, not a plain mean
    for key in list(shapes)[:: len(shapes) // 3]:
        expected = start[key] + sum(
            w * systems.client_delta(shapes, c)[key] for c, w in enumerate(weights)
        ) / sum(weights)
        torch.testing.assert_close(out[key], expected, rtol=1e-5, atol=1e-6)


def test_persisted_stream_gives_back_the_same_deltas(tmp_path):
    shapes = {"a.lora_A.weight": (2, 3), "a.lora_B.weight": (3, 2)}
    systems.persist_deltas(shapes, 3, tmp_path / "run")
    back = list(systems.persisted_stream(tmp_path / "run", 3))
    assert [n for n, _ in back] == [systems.client_examples(c) for c in range(3)]
    for c, (_, delta) in enumerate(back):
        for key, value in systems.client_delta(shapes, c).items():
            assert torch.equal(delta[key], value)
