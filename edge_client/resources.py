"""Measure what a piece of client work costs: peak memory, wall time and CPU time.

:class:`ResourceTracker` is a context manager around, typically, one round of local
training. It reports

* peak resident memory (RSS) of this process over the window: a background thread samples
  ``psutil`` every ``interval`` seconds, and the kernel's own high-water mark
  (``getrusage(...).ru_maxrss``) catches spikes shorter than the interval whenever the
  window pushed that lifetime mark higher;
* peak GPU memory allocated by PyTorch on the tracked CUDA device (0 without CUDA);
* wall seconds and process CPU seconds (user + system, all threads).

The bytes a client sent and received are not known here; the runner passes the transport's
counters to :meth:`ResourceTracker.report`.
"""

from __future__ import annotations

import logging
import resource
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import psutil

from shared.errors import ConfigError

if TYPE_CHECKING:
    from shared.protocol import ResourceReport

log = logging.getLogger(__name__)


def _ru_maxrss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class ResourceTracker:
    """Track peak RSS, peak GPU memory, wall and CPU time over a ``with`` block.

    Example::

        with ResourceTracker(device_class="jetson-orin-nano") as tracker:
            result = train_adapter(...)
        report = tracker.report(bytes_sent=sent, bytes_received=received)

    Args:
        device_class: Catalog device class for the report (``"unknown"`` if not known).
        interval: Seconds between RSS samples (> 0).
        cuda_device: CUDA device whose peak allocation to track (``None``: the current one
            when CUDA is in use, nothing otherwise). PyTorch's peak counter is reset on entry.

    Attributes:
        peak_rss_bytes: Highest RSS seen in the window (valid after exit, or live while running).
        peak_gpu_bytes: Highest ``torch.cuda.max_memory_allocated`` in the window, 0 without CUDA.
        wall_seconds: Wall-clock duration of the window.
        cpu_seconds: Process CPU time (user + system) spent in the window.
        samples: Number of RSS samples taken.
    """

    def __init__(self, device_class: str = "unknown", interval: float = 0.05, cuda_device: Any = None) -> None:
        if interval <= 0:
            raise ConfigError(f"resource sampling interval must be positive, got {interval}")
        self.device_class = device_class
        self.interval = interval
        self._cuda_device = cuda_device
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cuda = False
        self._wall_start = 0.0
        self._cpu_start = 0.0
        self._ru_start = 0
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes = 0
        self.wall_seconds = 0.0
        self.cpu_seconds = 0.0
        self.samples = 0
        self.running = False

    def __enter__(self) -> ResourceTracker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _cpu_time(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> int:
        """Take one RSS sample now (the background thread calls this every ``interval``).

        Returns:
            The current RSS in bytes.
        """
        rss = int(self._process.memory_info().rss)
        with self._lock:
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
            self.samples += 1
        return rss

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except psutil.Error as exc:  # pragma: no cover - the process itself is gone or hidden
                log.warning("RSS sampling stopped: %s", exc)
                return

    def start(self) -> None:
        """Start the window: reset the peaks, note the clocks, start sampling."""
        if self.running:
            raise RuntimeError("this ResourceTracker is already running")
        self.peak_rss_bytes = 0
        self.peak_gpu_bytes = 0
        self.samples = 0
        self._cuda = self._start_cuda()
        self._ru_start = _ru_maxrss_bytes()
        self._wall_start = time.perf_counter()
        self._cpu_start = self._cpu_time()
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="fedsoda-rss-sampler", daemon=True)
        self._thread.start()
        self.running = True

    def stop(self) -> None:
        """End the window: stop sampling and fix the totals (idempotent)."""
        if not self.running:
            return
        self.sample()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.wall_seconds = time.perf_counter() - self._wall_start
        self.cpu_seconds = self._cpu_time() - self._cpu_start
        ru_end = _ru_maxrss_bytes()
        if ru_end > self._ru_start:
            # The lifetime high-water mark rose inside the window, so the window's true peak
            # is exactly that mark, even if it lasted shorter than one sampling interval.
            self.peak_rss_bytes = max(self.peak_rss_bytes, ru_end)
        if self._cuda:
            import torch

            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(self._cuda_device))
        self.running = False

    def _start_cuda(self) -> bool:
        # Only look at CUDA when torch is already in use: importing torch (seconds) just to
        # learn there is no GPU would be pure overhead for a tracker.
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available():
            return False
        if self._cuda_device is None:
            self._cuda_device = torch.cuda.current_device()
        torch.cuda.reset_peak_memory_stats(self._cuda_device)
        return True

    def report(self, bytes_sent: int = 0, bytes_received: int = 0) -> ResourceReport:
        """Build the protocol's resource report for the window.

        Args:
            bytes_sent: Bytes this client published in the window (from the transport).
            bytes_received: Bytes it received in the window (from the transport).

        Returns:
            A :class:`shared.protocol.ResourceReport`; while still running, the figures so far.
        """
        from shared.protocol import ResourceReport

        if self.running:
            wall = time.perf_counter() - self._wall_start
            cpu = self._cpu_time() - self._cpu_start
        else:
            wall, cpu = self.wall_seconds, self.cpu_seconds
        return ResourceReport(
            peak_rss_bytes=int(self.peak_rss_bytes),
            peak_gpu_bytes=int(self.peak_gpu_bytes),
            wall_seconds=float(wall),
            cpu_seconds=float(cpu),
            bytes_sent=int(bytes_sent),
            bytes_received=int(bytes_received),
            device_class=self.device_class,
        )
