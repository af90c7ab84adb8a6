"""Smoke test of benchmarks/coordinator_memory.py without running prune.

The model builder on a tiny config, the measured child runner (peak from ``os.wait4``, the
RSS cap), the command line, and the JSON / markdown / PNG writers. No timing is asserted.
"""

from __future__ import annotations

import json
import sys

import pytest

from benchmarks import coordinator_memory as bench
from coordinator.model.footprint import estimate_coordinator_memory

TINY = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "intermediate_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 49152,  # the SmolLM2 tokenizer's ids all fit
    "tie_word_embeddings": True,
}
MIB = 1 << 20


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return bench.build_model("tiny", TINY, tmp_path_factory.mktemp("models") / "tiny")


def test_build_model_saves_a_loadable_random_model_once(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    meta = json.loads((tiny_model / "bench-model.json").read_text())
    assert meta["name"] == "tiny" and meta["params"] > 0
    config = AutoConfig.from_pretrained(tiny_model)
    assert config.num_hidden_layers == 4 and config.vocab_size == 49152
    assert len(AutoTokenizer.from_pretrained(tiny_model)) <= config.vocab_size
    stamp = (tiny_model / "bench-model.json").stat().st_mtime_ns
    assert bench.build_model("tiny", TINY, tiny_model) == tiny_model  # reused, not rebuilt
    assert (tiny_model / "bench-model.json").stat().st_mtime_ns == stamp


def test_build_model_refuses_a_vocabulary_smaller_than_the_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        bench.build_model("small-vocab", {**TINY, "vocab_size": 1000}, tmp_path / "m")


def test_run_measured_reads_the_childs_peak(tmp_path):
    code = "x = bytearray(300 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])"
    run = bench.run_measured([sys.executable, "-c", code], tmp_path, tmp_path / "log", 8 << 30, 0, 120)
    assert run["exit"] == 0 and run["stopped"] is None
    assert run["peak_rss"] >= 300 * MIB


def test_run_measured_stops_a_child_past_the_cap(tmp_path):
    code = "import time\nx = bytearray(400 * 1024 * 1024); x[::4096] = b'1' * len(x[::4096])\ntime.sleep(60)"
    run = bench.run_measured([sys.executable, "-c", code], tmp_path, tmp_path / "log", 200 * MIB, 0, 120)
    assert run["stopped"] and "cap" in run["stopped"]
    assert run["exit"] != 0
    assert run["wall_s"] < 60


def test_prune_argv_passes_every_setting(tmp_path):
    argv = bench.prune_argv("python", "bundled", tmp_path, 22)
    assert argv[:4] == ["python", "-c", "from coordinator.cli import app; app()", "prune"]
    assert argv[argv.index("--depths") + 1] == "22"
    for key, value in bench.PRUNE_SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        assert argv[argv.index(flag) + 1] == str(value)
    for name, depth in bench.DEPTHS.items():
        spec = bench.MODELS[name]
        layers = 30 if spec is None else spec["num_hidden_layers"]
        assert (layers - depth) % bench.BLOCK_SIZE == 0  # the block-size rule of prune


def _row(label: str, model: str, status: str = "ok", peak: int = 900 * MIB) -> dict:
    weights = 100 * MIB
    return {
        "label": label, "model": model, "status": status, "stopped": None if status == "ok" else "RSS passed the 20 GiB cap",
        "params": weights // 4, "num_layers": 4, "weight_bytes_fp32": weights, "peak_rss": peak,
        "baseline_rss": 250 * MIB, "above_baseline": peak - 250 * MIB, "ratio": (peak - 250 * MIB) / weights,
        "target_ratio": bench.TARGET_RATIO, "meets_target": False, "wall_s": 12.0, "peak_during": "> ODA: 1/3",
        "tree": "/x", "commit": "abc1234", "depth": 2, "settings": dict(bench.PRUNE_SETTINGS), "sgp_batch_size": 8,
    }


def test_results_round_trip_and_render(tmp_path, tiny_model):
    results = {"meta": {"machine": "test", "torch": "t", "transformers": "t"}, "rows": {}}
    results["rows"][bench.row_key("before", "tiny")] = _row("before", "tiny")
    results["rows"][bench.row_key("after", "tiny")] = _row("after", "tiny", peak=400 * MIB)
    results["rows"][bench.row_key("before", "big")] = _row("before", "big", status="stopped", peak=20 << 30)
    est = estimate_coordinator_memory(tiny_model, bench.workload_for(results["rows"]["after/tiny"]))
    results["rows"]["after/tiny"]["estimate"] = {**est.to_dict(), "error": (est.total - 400 * MIB) / (400 * MIB)}
    bench.write_outputs(results, tmp_path)
    assert bench.load_results(tmp_path / "coordinator_memory.json") == json.loads(json.dumps(results))
    assert bench.load_results(tmp_path / "missing.json") == {"meta": {}, "rows": {}}
    md = (tmp_path / "coordinator_memory.md").read_text()
    assert "| tiny |" in md and "| before |" in md and "| after |" in md
    assert ">= 20.00" in md  # a stopped run's peak is a lower bound
    assert "RSS passed the 20 GiB cap" in md
    assert est.describe() in md
    assert (tmp_path / "coordinator_memory.png").stat().st_size > 0
