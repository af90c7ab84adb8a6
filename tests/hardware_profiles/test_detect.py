"""Detection: probes, Jetson / RTX / CPU matching, overrides, and probes that fail.

The Jetson Orin Nano and RTX 3060 machines are faked (psutil, torch.cuda and the Jetson files
are monkeypatched, see conftest.py); the CPU-only case runs on this real machine.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from hardware_profiles.detect import (
    UNKNOWN,
    detect_hardware,
    detect_profile,
    match_device_class,
    process_rss_bytes,
)
from hardware_profiles.profile import load_catalog
from shared.errors import ConfigError

from .conftest import GIB, FakeMachine, make_jetson_root


def test_jetson_orin_nano_is_detected_from_its_files(orin_nano: Path) -> None:
    det = detect_hardware(root=orin_nano, name="nano-1")
    p = det.profile
    assert p.device_class == "jetson-orin-nano-8gb"
    assert p.is_jetson and p.unified_memory and p.accelerator == "cuda"
    assert p.compute_capability == "8.7" and p.gpu_name == "Orin"
    assert p.supports_4bit is False
    assert p.total_memory_bytes == int(7.4 * GIB) and p.cpu_count == 6 and p.name == "nano-1"
    assert "Orin Nano" in det.jetson_model
    assert {probe.name: probe.status for probe in det.probes} == {"memory": "ok", "cpu": "ok", "cuda": "ok", "jetson": "ok"}


def test_jetson_found_by_release_file_alone(fake_machine, tmp_path: Path) -> None:
    fake_machine(FakeMachine(total=int(15.3 * GIB), available=12 * GIB, cpus=8, gpu_name="Orin", gpu_total=int(15.3 * GIB), capability=(8, 7)))
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "nv_tegra_release").write_text("# R36 (release), REVISION: 3.0\n")
    det = detect_hardware(root=root)
    assert det.profile.is_jetson
    # No model string: the closest Jetson by memory.
    assert det.profile.device_class == "jetson-orin-nx-16gb"
    assert "memory" in det.match_reason


def test_agx_orin_32_and_64_are_told_apart_by_memory(fake_machine, tmp_path: Path) -> None:
    for total, expected in ((30.6, "jetson-agx-orin-32gb"), (61.4, "jetson-agx-orin-64gb")):
        fake_machine(FakeMachine(total=int(total * GIB), available=20 * GIB, cpus=12, gpu_name="Orin", gpu_total=int(total * GIB), capability=(8, 7)))
        root = make_jetson_root(tmp_path / expected, "Jetson AGX Orin Developer Kit")
        assert detect_profile(root=root).device_class == expected


def test_rtx_3060_box_is_detected_by_gpu_name(rtx3060_box: Path) -> None:
    det = detect_hardware(root=rtx3060_box)
    p = det.profile
    assert p.device_class == "rtx-3060-12gb"
    assert not p.is_jetson and not p.unified_memory and p.accelerator == "cuda"
    assert p.gpu_total_memory_bytes == 12 * GIB and p.gpu_free_memory_bytes == int(11.2 * GIB)
    assert p.compute_capability == "8.6"
    assert p.supports_4bit is True  # bitsandbytes is installed and the class supports it
    assert "RTX 3060" in det.match_reason


def test_gpu_names_match_whole_words(fake_machine, tmp_path: Path) -> None:
    # "RTX 3060" must not match an "RTX 30600"; an unlisted card gets the closest class by memory.
    fake_machine(FakeMachine(total=64 * GIB, available=60 * GIB, cpus=32, gpu_name="NVIDIA RTX 30600", gpu_total=24 * GIB, gpu_free=23 * GIB, capability=(9, 0)))
    det = detect_hardware(root=tmp_path)
    assert det.profile.device_class in ("rtx-4090-24gb", "nvidia-l4-24gb")
    assert "not in the catalog" in det.match_reason


def test_cpu_only_machine_gets_the_largest_cpu_class_it_has_memory_for() -> None:
    # The real machine (torch here is a CPU build).
    det = detect_hardware(root="/nonexistent-root")
    p = det.profile
    assert p.accelerator == "cpu" and p.gpu_name == "" and not p.is_jetson
    cls = det.device_class
    assert cls is not None and cls.kind == "cpu"
    assert cls.memory_bytes * 0.88 <= p.total_memory_bytes
    bigger = [c for c in load_catalog().of_kind("cpu") if c.memory_gib > cls.memory_gib]
    assert all(c.memory_bytes * 0.88 > p.total_memory_bytes for c in bigger)


@pytest.mark.parametrize(("gib", "expected"), [(7.6, "cpu-8gb"), (15.5, "cpu-16gb"), (23.0, "cpu-16gb"), (31.3, "cpu-32gb"), (256, "cpu-32gb")])
def test_cpu_class_thresholds(fake_machine, tmp_path: Path, gib: float, expected: str) -> None:
    fake_machine(FakeMachine(total=int(gib * GIB), available=int(gib * GIB * 0.7), cpus=8))
    assert detect_profile(root=tmp_path).device_class == expected


def test_too_little_memory_matches_no_class(fake_machine, tmp_path: Path) -> None:
    fake_machine(FakeMachine(total=2 * GIB, available=GIB, cpus=2))
    det = detect_hardware(root=tmp_path)
    assert det.profile.device_class == UNKNOWN and det.device_class is None
    assert "less than the smallest" in det.match_reason


def test_override_by_name(orin_nano: Path) -> None:
    det = detect_hardware(root=orin_nano, override="jetson-orin-nx-16gb")
    assert det.profile.device_class == "jetson-orin-nx-16gb"
    assert "override" in det.match_reason
    with pytest.raises(ConfigError, match="unknown device class 'orin-nano'"):
        detect_profile(root=orin_nano, override="orin-nano")


def test_failing_probes_degrade_to_unknown(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(*_a, **_k):
        raise RuntimeError("no /proc/meminfo in this sandbox")

    monkeypatch.setattr(psutil, "virtual_memory", boom)
    monkeypatch.setattr(psutil, "cpu_count", boom)
    monkeypatch.setattr(torch.cuda, "is_available", boom)
    det = detect_hardware(root=tmp_path)
    status = {probe.name: probe.status for probe in det.probes}
    assert status == {"memory": "unknown", "cpu": "unknown", "cuda": "unknown", "jetson": "absent"}
    assert det.profile.total_memory_bytes == 0 and det.profile.cpu_count == 0
    assert det.profile.device_class == UNKNOWN
    assert "memory unknown" in det.match_reason


def test_missing_psutil_is_unknown_not_a_crash(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import builtins

    real_import = builtins.__import__

    def no_psutil(name, *args, **kwargs):
        if name == "psutil":
            raise ImportError("No module named 'psutil'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_psutil)
    det = detect_hardware(root=tmp_path)
    assert [p.detail for p in det.probes if p.name == "memory"] == ["psutil is not installed"]
    assert process_rss_bytes() == 0


def test_match_function_on_a_hand_built_profile(rtx3060_box: Path) -> None:
    profile = detect_profile(root=rtx3060_box)
    cls, reason = match_device_class(profile, load_catalog())
    assert cls is not None and cls.name == "rtx-3060-12gb" and reason


def test_process_rss_counts_this_process() -> None:
    # torch is imported, so the process holds well over 100 MiB.
    assert process_rss_bytes() > 100 * 2**20
