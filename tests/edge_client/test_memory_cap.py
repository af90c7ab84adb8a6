"""The client's memory cap (edge_client.memory_cap): a real RLIMIT_DATA on a real process.

Every cap is applied in a child process (the pytest process is never capped), which prints
what happened as JSON: allocations above the cap fail with the project's clear error, below
it they work, a cap below what the process already uses is refused with both numbers, and a
real training run under a cap below its need ends with the out-of-memory error naming the cap
and the estimate. Size parsing (``--memory-limit``, ``simulate --profiles``) is at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hardware_profiles.memory import parse_bytes
from shared.errors import ConfigError

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the cap is Linux's RLIMIT_DATA")

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20


def _run_child(code: str, *, timeout: float = 120.0, preexec_fn=None) -> dict:
    """Run ``code`` in a fresh interpreter and return the JSON it printed on its last line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout,
        env=env, cwd=ROOT, preexec_fn=preexec_fn,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_ALLOCATIONS = """
    import json
    import torch
    from edge_client.memory_cap import apply_memory_cap, data_in_use_bytes, out_of_memory_guard
    from shared.errors import InsufficientMemoryError

    MIB = 1 << 20
    before = data_in_use_bytes()
    cap = apply_memory_cap(before + 256 * MIB)
    out = {"before": before, "cap": cap}

    def attempt(name, mib, make):
        try:
            with out_of_memory_guard(f"allocating {mib} MiB", limit_bytes=cap, estimate_bytes=200 * MIB):
                block = make(mib * MIB)
            out[name] = "allocated"
            del block
        except InsufficientMemoryError as exc:
            out[name] = str(exc)

    attempt("torch_small", 64, lambda n: torch.ones(n // 4))
    attempt("torch_big", 512, lambda n: torch.ones(n // 4))
    attempt("python_big", 512, bytearray)
    attempt("torch_small_again", 64, lambda n: torch.ones(n // 4))
    import resource
    out["rlimit"] = list(resource.getrlimit(resource.RLIMIT_DATA))
    print(json.dumps(out))
"""


def test_allocations_below_the_cap_work_and_above_it_fail_with_the_clear_error():
    out = _run_child(_ALLOCATIONS)
    assert out["cap"] == out["before"] + 256 * MIB
    assert out["rlimit"] == [out["cap"], out["cap"]]  # soft and hard: nothing in the process lifts it
    assert out["torch_small"] == "allocated" and out["torch_small_again"] == "allocated"
    for name in ("torch_big", "python_big"):
        message = out[name]
        assert message.startswith("ran out of memory while allocating 512 MiB under the ")
        assert "memory cap (--memory-limit); the plan estimated 200.00 MiB" in message
    assert "can't allocate memory" in out["torch_big"]  # torch's own words are kept at the end


def test_a_cap_below_what_the_process_already_uses_is_refused_with_both_numbers():
    out = _run_child("""
        import json
        from edge_client.memory_cap import apply_memory_cap, data_in_use_bytes
        from hardware_profiles.memory import describe_bytes
        from shared.errors import InsufficientMemoryError

        import torch  # noqa: F401  (a client has torch loaded when it applies the cap)
        in_use = data_in_use_bytes()
        try:
            apply_memory_cap(64 << 20)
            print(json.dumps({"refused": False}))
        except InsufficientMemoryError as exc:
            import resource
            print(json.dumps({"refused": True, "message": str(exc), "in_use": describe_bytes(in_use),
                              "limit_untouched": resource.getrlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY}))
    """)
    assert out["refused"] and out["limit_untouched"]
    assert out["message"].startswith("memory cap of 64.00 MiB is below the ")
    # The number in use is measured inside apply_memory_cap, a moment after the child's own read.
    in_use_said = out["message"].split("is below the ")[1].split(" this process")[0]
    assert in_use_said.endswith("MiB") and float(in_use_said.split()[0]) >= 100, out
    assert abs(float(in_use_said.split()[0]) - float(out["in_use"].split()[0])) < 5


def _tight_data_limit() -> None:  # runs in the child between fork and exec
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (3 << 30, resource.RLIM_INFINITY))


def test_a_tighter_limit_already_in_force_is_kept_and_returned():
    out = _run_child("""
        import json
        from edge_client.memory_cap import apply_memory_cap
        print(json.dumps({"applied": apply_memory_cap(8 << 30)}))
    """, preexec_fn=_tight_data_limit)
    assert out["applied"] == 3 << 30


def test_training_under_a_cap_below_its_need_ends_with_out_of_memory_naming_cap_and_estimate(tiny_model_dir):
    """A real round of LoRA training (the client's trainer) under a cap of 60% of the estimate,
    then the same round under a cap of the whole estimate: the first runs out, the second finishes."""
    code = f"""
        import json, sys
        from pathlib import Path
        from edge_client.memory_cap import apply_memory_cap, out_of_memory_guard
        from shared.errors import InsufficientMemoryError
        from coordinator.model.datasets import movie_reviews, train_test_split
        from coordinator.model.models import load_model
        from coordinator.model.presets import task_preset
        from edge_client.data import dataset_from_records
        from edge_client.trainer import train_adapter
        from hardware_profiles.memory import estimate_training_memory
        from hardware_profiles.training_setup import TrainingSetup
        from tests.edge_client.helpers import make_params

        model_dir = Path({str(tiny_model_dir)!r})
        config = json.loads((model_dir / "config.json").read_text())
        setup = TrainingSetup(num_layers=4, precision="fp32", batch_size=4, seq_len=128, device="cpu", padded=True)
        estimate = estimate_training_memory(config, setup).total_bytes
        cap = apply_memory_cap(int(estimate * float(sys.argv[1])))
        train, _ = train_test_split(movie_reviews("rotten_tomatoes"), test_fraction=0.2, seed=0)
        data = dataset_from_records(train[:32], task_preset("rotten_tomatoes"), source="rt")
        try:
            with out_of_memory_guard("loading the sub-LLM", limit_bytes=cap, estimate_bytes=estimate):
                model, tokenizer = load_model(model_dir)
            with out_of_memory_guard("training round 1", limit_bytes=cap, estimate_bytes=estimate):
                train_adapter(model, tokenizer, data, make_params(batch_size=4, seq_len=128, local_steps=2),
                              None, [0, 1, 2, 3], "model.layers", "cpu")
            print(json.dumps({{"trained": True, "cap": cap, "estimate": estimate}}))
        except InsufficientMemoryError as exc:
            print(json.dumps({{"trained": False, "message": str(exc), "cap": cap, "estimate": estimate}}))
    """
    starved = _run_child(code.replace("sys.argv[1]", "0.6"), timeout=300)
    assert not starved["trained"], starved
    assert starved["message"].startswith("ran out of memory while training round 1 under the "), starved
    assert "memory cap (--memory-limit); the plan estimated" in starved["message"]
    assert "the cap is below the plan's estimate" in starved["message"]
    fed = _run_child(code.replace("sys.argv[1]", "1.0"), timeout=300)
    assert fed["trained"], fed  # the estimate holds under a real cap of itself


@pytest.mark.parametrize("text, expected", [
    ("1.5GiB", 3 << 29), ("800MiB", 800 * MIB), ("800 mib", 800 * MIB), ("1048576", 1 << 20),
    ("2gib", 2 << 30), (" 64KiB ", 64 << 10), ("1TiB", 1 << 40), (".5GiB", 1 << 29), ("512B", 512),
])
def test_sizes_parse_in_binary_units(text, expected):
    assert parse_bytes(text, "--memory-limit") == expected


@pytest.mark.parametrize("text, words", [
    ("", "is not a size"), ("abc", "is not a size"), ("-1GiB", "is not a size"), ("1e9", "is not a size"),
    ("0", "more than 0 bytes"), ("0.0001KiB", "more than 0 bytes"), ("1.5", "whole number"),
    ("2GB", "'GB' is ambiguous"), ("8g", "'g' is ambiguous"), ("3XB", "unknown unit 'XB'"),
])
def test_bad_sizes_are_config_errors_that_say_how_to_write_one(text, words):
    with pytest.raises(ConfigError, match="--memory-limit") as info:
        parse_bytes(text, "--memory-limit")
    assert words in str(info.value) and "1.5GiB" in str(info.value)
