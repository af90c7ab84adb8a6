"""Resource accounting (edge_client.resources) against allocations of known size."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from edge_client.resources import ResourceTracker
from shared.errors import ConfigError
from shared.protocol import ResourceReport

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


def _wait_for_samples(tracker: ResourceTracker, count: int, timeout: float = 10.0) -> None:
    """Block until the background thread has taken ``count`` more samples."""
    target = tracker.samples + count
    deadline = time.monotonic() + timeout
    tick = threading.Event()
    while tracker.samples < target:
        assert time.monotonic() < deadline, "the sampler thread took no samples"
        tick.wait(tracker.interval / 2)


def test_peak_rss_covers_a_known_allocation_seen_by_the_sampler():
    size = 200 * MIB
    with ResourceTracker(interval=0.01) as tracker:
        before = psutil.Process().memory_info().rss
        # Fresh anonymous pages, each written, so all of them become resident; a plain bytes
        # object could reuse heap pages that earlier tests freed but left resident.
        block = mmap.mmap(-1, size)
        chunk = b"\x01" * MIB
        for offset in range(0, size, MIB):
            block[offset : offset + MIB] = chunk
        _wait_for_samples(tracker, 2)
        block.close()
    assert tracker.peak_rss_bytes >= before + 0.95 * size
    assert tracker.samples >= 3


def test_a_spike_shorter_than_the_sampling_interval_is_caught_by_ru_maxrss():
    # A fresh interpreter, so its lifetime high-water mark is low and the spike raises it; the
    # sampler would wait an hour before its first background sample.
    script = (
        "import json; from edge_client.resources import ResourceTracker\n"
        "with ResourceTracker(interval=3600) as t:\n"
        "    before = t.peak_rss_bytes\n"
        "    block = b'\\x01' * (300 * 1024 * 1024); del block\n"
        "print(json.dumps([before, t.peak_rss_bytes, t.samples]))\n"
    )
    # Through sh, which forks the interpreter: a process exec'd straight from this one would
    # inherit this process's RSS high-water mark (Linux keeps it across exec), hiding the spike.
    out = subprocess.run(
        ["sh", "-c", '"$0" -c "$1"; true', sys.executable, script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, peak, samples = json.loads(out.stdout.strip().splitlines()[-1])
    assert samples == 2  # only the samples at start and stop, both after the spike was freed
    assert peak >= before + 0.95 * 300 * MIB


def test_wall_and_cpu_time():
    with ResourceTracker() as tracker:
        end = time.process_time() + 0.3
        while time.process_time() < end:  # burn CPU
            pass
        threading.Event().wait(0.2)  # and idle
    assert tracker.cpu_seconds >= 0.25
    assert tracker.wall_seconds >= tracker.cpu_seconds + 0.15 or tracker.wall_seconds >= 0.5


def test_report_fills_the_protocol_message():
    with ResourceTracker(device_class="rpi5-8gb") as tracker:
        live = tracker.report()
        assert live.wall_seconds >= 0
    report = tracker.report(bytes_sent=123, bytes_received=4567)
    assert isinstance(report, ResourceReport)
    assert report.device_class == "rpi5-8gb" and report.bytes_sent == 123 and report.bytes_received == 4567
    assert report.peak_rss_bytes == tracker.peak_rss_bytes > 0
    assert report.wall_seconds == tracker.wall_seconds and report.cpu_seconds == tracker.cpu_seconds
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        assert report.peak_gpu_bytes == 0


def test_bad_interval_and_double_start():
    with pytest.raises(ConfigError):
        ResourceTracker(interval=0)
    tracker = ResourceTracker()
    tracker.start()
    try:
        with pytest.raises(RuntimeError):
            tracker.start()
    finally:
        tracker.stop()
    tracker.stop()  # idempotent


@pytest.mark.gpu
def test_peak_gpu_memory_covers_a_known_allocation():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    with ResourceTracker() as tracker:
        block = torch.ones(64 * MIB // 4, device="cuda")
        del block
    assert tracker.peak_gpu_bytes >= 64 * MIB
