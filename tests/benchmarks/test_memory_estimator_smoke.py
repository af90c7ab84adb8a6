"""Smoke test of benchmarks/memory_estimator.py: one tiny random-weight configuration end to
end (model build, child training process measured with ``os.wait4``, estimate, JSON /
markdown / PNG), then ``--reestimate`` on the stored row. No timing or accuracy is asserted:
the accuracy check is the benchmark itself."""

from __future__ import annotations

import json
import sys

from benchmarks import memory_estimator as bench

TINY_GPT2 = {
    "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 128, "n_ctx": 128,
    "vocab_size": 49152, "activation_function": "gelu_new", "attn_pdrop": 0.1, "resid_pdrop": 0.1, "embd_pdrop": 0.1,
}
CONFIG = ("tiny-gpt2-fp32-b2s32", "tiny-gpt2", 2, "fp32", 4, ("c_attn",), 2, 32, False, 0.0)


def test_one_tiny_configuration_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))  # the model is built there (the child inherits it)
    monkeypatch.setattr(bench, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(bench, "CONFIGS", [CONFIG])
    monkeypatch.setattr(bench, "ARCHITECTURES", {**bench.ARCHITECTURES, "tiny-gpt2": TINY_GPT2})
    monkeypatch.setattr(sys, "argv", ["memory_estimator.py", "--only", CONFIG[0], "--steps", "2"])
    bench.main()  # the exit code says whether the tiny model met the target: not asserted here
    data = json.loads((tmp_path / "results" / "memory_estimator.json").read_text())
    (row,) = data["rows"]
    assert row["name"] == CONFIG[0] and row["arch"] == "tiny-gpt2"
    assert row["measured_bytes"] > 200 << 20  # a Python process with torch imported
    assert row["estimate_bytes"] == sum(v for k, v in row["breakdown"].items() if k not in ("framework", "load_peak")) + row["breakdown"]["framework"]
    assert set(row["stage_peaks"]) >= {"imports", "load", "step1", "step2"}
    assert data["meta"]["per_arch"]["tiny-gpt2"]["configs"] == 1
    table = (tmp_path / "results" / "memory_estimator.md").read_text()
    assert f"| {CONFIG[0]} | tiny-gpt2 | 2 |" in table and "| tiny-gpt2 | 1 |" in table
    assert (tmp_path / "results" / "memory_estimator.png").stat().st_size > 0

    # Re-estimating keeps the measurement and recomputes the estimate.
    monkeypatch.setattr(sys, "argv", ["memory_estimator.py", "--reestimate"])
    bench.main()
    again = json.loads((tmp_path / "results" / "memory_estimator.json").read_text())["rows"][0]
    assert again["measured_bytes"] == row["measured_bytes"] and again["estimate_bytes"] == row["estimate_bytes"]
    assert "stored" in capsys.readouterr().out
