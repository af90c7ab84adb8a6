"""`fedsoda-coordinator prune` end to end on the cut SmolLM2 copy (tiny settings)."""

from __future__ import annotations

import json
import logging

import pytest
from typer.testing import CliRunner

from coordinator.cli import app
from coordinator.model.datasets import public_text
from coordinator.model.tierset import load_tiers
from shared.subllm import read_meta


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI configures the root logger for the terminal; give later tests the old setup back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    noisy = {name: logging.getLogger(name).level for name in ("transformers", "accelerate", "peft", "bitsandbytes")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


@pytest.fixture(scope="module")
def public_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("public") / "public.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in public_text("wikipedia", n=12)))
    return path


def test_prune_writes_report_and_tiers(tiny_model_dir, public_file, tmp_path):
    out = tmp_path / "prune"
    args = [
        "prune", "--model", str(tiny_model_dir), "--public-data", str(public_file), "--out", str(out),
        "--block-size", "1", "--depths", "3,4", "--calib-samples", "6", "--eval-samples", "4",
        "--seq-len", "32", "--oda-steps", "2", "--precision", "fp32", "--json",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["perplexity"]) == {"full", "sgp", "uniform", "sgp+oda", "uniform+oda"}
    assert all(v > 1 for v in report["perplexity"].values())
    assert len(report["sgp_layers"]) == 3 and report["sgp_layers"][0] == 0 and report["sgp_layers"][-1] == 3
    assert report["tiers"]["L4"] == [0, 1, 2, 3] and report["tiers"]["L3"] == report["sgp_layers"]
    assert [b["layers"] for b in report["ranking"]] and all(len(b["layers"]) == 1 for b in report["ranking"])
    for name in ("report.json", "report.md", "distances.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "distances.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The tiers are laid out as serve lays them out in a run directory (serve --tiers reads them).
    meta = read_meta(out / "tiers" / "L3" / "v1")
    assert list(meta.layer_map) == report["sgp_layers"] and meta.precision == "fp32"
    assert report["packages"]["L3"] == str(out / "tiers" / "L3" / "v1")
    tierset = load_tiers(out)
    assert tierset.method == "fedsoda" and tierset.layer_maps() == report["tiers"]
    assert (out / "tiers" / "L3" / "aligned_v1.safetensors").is_file()
    assert "SGP" in (out / "report.md").read_text()
    # Not a terminal: the long steps are shown as lines as they go, not as a silent progress bar.
    assert "ODA: aligning tier L3 (3 layers) to the full model (2 steps)" in result.output
    # The memory estimate is printed before the model is loaded.
    assert result.output.index("the coordinator needs about") < result.output.index("loading")


def test_prune_refuses_before_loading_when_memory_is_short(tiny_model_dir, public_file, tmp_path, monkeypatch):
    import coordinator.model.preflight as preflight

    monkeypatch.setattr(preflight, "available_memory", lambda device: 64 << 20)  # a 64 MiB machine
    result = CliRunner().invoke(
        app, ["prune", "--model", str(tiny_model_dir), "--public-data", str(public_file), "--out", str(tmp_path / "p"),
              "--block-size", "1", "--depths", "3", "--device", "cpu", "--dtype", "fp32"],
    )
    assert result.exit_code != 0
    assert "only 64.00 MiB of RAM is available" in result.output, result.output
    assert "loading" not in result.output and not (tmp_path / "p").exists()


def test_prune_reports_unreachable_depth(tiny_model_dir, public_file, tmp_path):
    result = CliRunner().invoke(
        app,
        ["prune", "--model", str(tiny_model_dir), "--public-data", str(public_file), "--out", str(tmp_path),
         "--block-size", "2", "--depths", "3", "--no-oda"],
    )
    assert result.exit_code == 2
    assert "depth 3 cannot be reached" in result.output


def test_prune_chunk_tokens_reaches_the_distillation(tiny_model_dir, public_file, tmp_path):
    result = CliRunner().invoke(
        app, ["prune", "--model", str(tiny_model_dir), "--public-data", str(public_file), "--out", str(tmp_path / "p"),
              "--block-size", "1", "--depths", "3", "--chunk-tokens", "0"],
    )
    assert result.exit_code != 0
    assert "kl_chunk_tokens must be >= 1, got 0" in result.output, result.output
