"""Fixtures of the hardware_profiles tests: fake Jetson / RTX machines for detection, and the
model config, ranking and planner options several test modules share.

Only the hardware is faked (psutil's memory figures, torch.cuda's device answers and the
Jetson files under a temporary root); everything else (catalog, matching, estimator,
planner) is the real code.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from hardware_profiles.planner import PlannerOptions

GIB = 1 << 30

LLAMA_7B = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False,
}
"""A Llama-2-7B-shaped config (built on the meta device only)."""

# A plausible SGP ranking of single layers for a 32-layer model: middle-to-late layers first,
# the first and last layers protected.
RANKING = [[i] for i in (24, 25, 23, 26, 22, 27, 21, 28, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 29, 30, 1)]
OPTIONS = PlannerOptions(lora_rank=8, lora_targets=("q_proj", "v_proj"), batch_size=4, seq_len=512)

_VM = namedtuple("_VM", ["total", "available", "percent", "used", "free"])


@dataclass
class FakeMachine:
    """What a faked machine reports."""

    total: int
    available: int
    cpus: int
    gpu_name: str = ""
    gpu_total: int = 0
    gpu_free: int = 0
    capability: tuple[int, int] = (0, 0)


def _install(monkeypatch: pytest.MonkeyPatch, machine: FakeMachine) -> None:
    monkeypatch.setattr(psutil, "virtual_memory", lambda: _VM(machine.total, machine.available, 0.0, 0, machine.available))
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: machine.cpus)
    has_gpu = bool(machine.gpu_name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    if has_gpu:
        props = type("Props", (), {"total_memory": machine.gpu_total, "name": machine.gpu_name})()
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=0: machine.gpu_name)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=0: machine.capability)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=0: props)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (machine.gpu_free, machine.gpu_total))
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture
def fake_machine(monkeypatch: pytest.MonkeyPatch):
    """``fake_machine(FakeMachine(...))`` makes psutil and torch.cuda report that machine."""
    return lambda machine: _install(monkeypatch, machine)


def make_jetson_root(root: Path, model: str, release: str = "# R36 (release), REVISION: 4.0, GCID: 1, BOARD: generic") -> Path:
    """A fake filesystem root with the two files a Jetson has."""
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "etc" / "nv_tegra_release").write_text(release + "\n")
    (root / "proc" / "device-tree").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "device-tree" / "model").write_bytes(model.encode() + b"\x00")
    return root


@pytest.fixture
def orin_nano(fake_machine, tmp_path: Path) -> Path:
    """A Jetson Orin Nano 8GB Developer Kit (JetPack 6): returns its fake filesystem root."""
    fake_machine(
        FakeMachine(
            total=int(7.4 * GIB), available=int(5.8 * GIB), cpus=6,
            gpu_name="Orin", gpu_total=int(7.4 * GIB), gpu_free=int(5.6 * GIB), capability=(8, 7),
        )
    )
    return make_jetson_root(tmp_path / "root", "NVIDIA Jetson Orin Nano Developer Kit")


@pytest.fixture
def rtx3060_box(fake_machine, tmp_path: Path) -> Path:
    """An x86-64 desktop, 32 GB RAM, GeForce RTX 3060 12 GB: returns an empty filesystem root."""
    fake_machine(
        FakeMachine(
            total=32 * GIB, available=26 * GIB, cpus=16,
            gpu_name="NVIDIA GeForce RTX 3060", gpu_total=12 * GIB, gpu_free=int(11.2 * GIB), capability=(8, 6),
        )
    )
    root = tmp_path / "root"
    root.mkdir()
    return root
