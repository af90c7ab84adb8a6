"""Hardware detection: measure this machine and find its closest catalog class.

Four probes, each of which may be unavailable without breaking the others:

* ``memory`` / ``cpu``: :mod:`psutil` (total and available RAM, logical CPUs);
* ``cuda``: :mod:`torch` when it is installed and sees a CUDA device (name, total and free
  memory of device 0, compute capability);
* ``jetson``: ``/etc/nv_tegra_release`` (L4T release string) or the device-tree model
  (``/proc/device-tree/model``, e.g. ``NVIDIA Jetson Orin Nano Developer Kit``).

A probe that cannot run reports status ``unknown`` with the reason and contributes zeros /
empty strings; nothing here raises for missing hardware. The measured numbers go into a
:class:`shared.protocol.DeviceProfile` (what a client sends in its Hello); the class match
(or the user's override by name) fills ``device_class``.

:func:`process_rss_bytes` measures the calling process itself: a client adds it back to the
memory available, since the estimate already counts the whole process.

:func:`emulated_profile` is the profile of a client running under a memory cap
(``join --memory-limit``, ``simulate --profiles CLASS[:SIZE]``): a catalog class's
capabilities on this machine's CPU, with its memory capped at the limit.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import platform
import re
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from hardware_profiles.profile import GIB, Catalog, DeviceClass, load_catalog
from shared.protocol import DeviceProfile

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
"""``device_class`` of a profile that matched no catalog class."""

ProbeStatus = Literal["ok", "absent", "unknown"]

#: A "16 GB" box reports ~15.5 GiB and an "8 GB" Jetson ~7.4 GiB: a class matches a machine
#: whose memory is within this fraction below the class's nominal figure.
MEMORY_TOLERANCE = 0.12

_JETSON_FILES = ("etc/nv_tegra_release",)
_MODEL_FILES = ("proc/device-tree/model", "sys/firmware/devicetree/base/model")


@dataclass(frozen=True)
class Probe:
    """What one probe found.

    Attributes:
        name: ``memory``, ``cpu``, ``cuda`` or ``jetson``.
        status: ``ok`` (measured), ``absent`` (looked, there is none: no CUDA device, not a
            Jetson) or ``unknown`` (could not look: library missing, probe failed).
        detail: One line for humans (the value found, or why it is unknown).
    """

    name: str
    status: ProbeStatus
    detail: str


@dataclass(frozen=True)
class Detection:
    """The result of :func:`detect_hardware`.

    Attributes:
        profile: Measured profile with ``device_class`` set (or ``"unknown"``).
        device_class: The matched (or overriding) catalog class, ``None`` if none matched.
        match_reason: Why that class (or why none).
        probes: Every probe's outcome, in order memory, cpu, cuda, jetson.
        jetson_model: Device-tree model or L4T release line, ``""`` when not a Jetson.
    """

    profile: DeviceProfile
    device_class: DeviceClass | None
    match_reason: str
    probes: tuple[Probe, ...]
    jetson_model: str


@dataclass(frozen=True)
class _Cuda:
    name: str = ""
    total: int = 0
    free: int = 0
    capability: str = ""


def probe_memory() -> tuple[int, int, int, list[Probe]]:
    """Total RAM, available RAM and logical CPUs through psutil.

    Returns:
        ``(total_bytes, available_bytes, cpu_count, [memory probe, cpu probe])``; zeros with
        status ``unknown`` where psutil is missing or fails.
    """
    try:
        import psutil
    except ImportError:
        reason = "psutil is not installed"
        return 0, 0, 0, [Probe("memory", "unknown", reason), Probe("cpu", "unknown", reason)]
    probes = []
    try:
        vm = psutil.virtual_memory()
        total, available = int(vm.total), int(vm.available)
        probes.append(Probe("memory", "ok", f"{total / GIB:.1f} GiB total, {available / GIB:.1f} GiB available"))
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means "unknown", never a crash
        total = available = 0
        probes.append(Probe("memory", "unknown", f"psutil.virtual_memory failed: {exc}"))
    try:
        cpus = int(psutil.cpu_count(logical=True) or 0)
        probes.append(Probe("cpu", "ok" if cpus else "unknown", f"{cpus} logical CPUs" if cpus else "psutil gave no CPU count"))
    except Exception as exc:  # noqa: BLE001
        cpus = 0
        probes.append(Probe("cpu", "unknown", f"psutil.cpu_count failed: {exc}"))
    return total, available, cpus, probes


def probe_cuda() -> tuple[_Cuda, Probe]:
    """CUDA device 0 through torch (name, total / free memory, compute capability).

    Returns:
        The device facts (empty when there is none) and the probe outcome.
    """
    if importlib.util.find_spec("torch") is None:
        return _Cuda(), Probe("cuda", "unknown", "torch is not installed")
    try:
        import torch

        if not torch.cuda.is_available():
            return _Cuda(), Probe("cuda", "absent", "torch sees no CUDA device")
        name = str(torch.cuda.get_device_name(0))
        major, minor = torch.cuda.get_device_capability(0)
        total = int(torch.cuda.get_device_properties(0).total_memory)
        try:
            free, total_now = torch.cuda.mem_get_info(0)
            free, total = int(free), int(total_now)
        except Exception as exc:  # noqa: BLE001 - free memory is optional; total still counts
            log.debug("torch.cuda.mem_get_info failed: %s", exc)
            free = 0
        count = torch.cuda.device_count()
        cuda = _Cuda(name=name, total=total, free=free, capability=f"{major}.{minor}")
        extra = f" (device 0 of {count})" if count > 1 else ""
        detail = f"{name}{extra}, sm_{major}{minor}, {total / GIB:.1f} GiB, {free / GIB:.1f} GiB free"
        return cuda, Probe("cuda", "ok", detail)
    except Exception as exc:  # noqa: BLE001 - a broken driver must not stop the client
        return _Cuda(), Probe("cuda", "unknown", f"CUDA probe failed: {exc}")


def probe_jetson(root: str | Path = "/") -> tuple[bool, str, Probe]:
    """Whether this is an NVIDIA Jetson, from the L4T release file or the device-tree model.

    Args:
        root: Filesystem root to look under (tests point it at a fake tree).

    Returns:
        ``(is_jetson, model string, probe)``. The model string is the device-tree model when
        readable, else the first line of ``nv_tegra_release``.
    """
    root = Path(root)
    model = ""
    for rel in _MODEL_FILES:
        text = _read_text(root / rel)
        if text:
            model = text
            break
    release = ""
    for rel in _JETSON_FILES:
        release = _read_text(root / rel)
        if release:
            break
    is_jetson = bool(release) or "jetson" in model.lower()
    if not is_jetson:
        return False, "", Probe("jetson", "absent", "no /etc/nv_tegra_release and no Jetson device-tree model")
    shown = model if "jetson" in model.lower() else (model or release.splitlines()[0])
    return True, shown, Probe("jetson", "ok", shown)


def _read_text(path: Path) -> str:
    try:
        # The device-tree model is NUL-terminated.
        return path.read_bytes().replace(b"\x00", b"").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def measure_profile(*, root: str | Path = "/", name: str | None = None) -> tuple[DeviceProfile, list[Probe], str]:
    """Run every probe and build an unmatched profile (``device_class = "unknown"``).

    Args:
        root: Filesystem root for the Jetson probe.
        name: Device name to report (default: the host name).

    Returns:
        ``(profile, probes, jetson_model)``.
    """
    total, available, cpus, probes = probe_memory()
    cuda, cuda_probe = probe_cuda()
    is_jetson, jetson_model, jetson_probe = probe_jetson(root)
    probes += [cuda_probe, jetson_probe]
    accelerator = "cuda" if cuda.name else "cpu"
    profile = DeviceProfile(
        name=name or socket.gethostname() or "unknown-host",
        device_class=UNKNOWN,
        accelerator=accelerator,
        total_memory_bytes=total,
        available_memory_bytes=available,
        unified_memory=is_jetson,
        gpu_name=cuda.name,
        gpu_total_memory_bytes=cuda.total,
        gpu_free_memory_bytes=cuda.free,
        compute_capability=cuda.capability,
        cpu_count=cpus,
        supports_4bit=_bitsandbytes_4bit_likely(accelerator, is_jetson),
        is_jetson=is_jetson,
    )
    return profile, probes, jetson_model


def _bitsandbytes_4bit_likely(accelerator: str, is_jetson: bool) -> bool:
    """Without a catalog class: bitsandbytes is installed and its wheels cover this platform."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    if is_jetson:
        return False  # PyPI aarch64 wheels are built for SBSA servers, not L4T (see the catalog)
    return accelerator == "cuda" or platform.machine().lower() in ("x86_64", "amd64")


def _mentions(haystack: str, needle: str) -> bool:
    """Case-insensitive whole-word containment ('RTX 3060' is in 'NVIDIA GeForce RTX 3060')."""
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(needle.lower())}(?![A-Za-z0-9])", haystack.lower()) is not None


def _closest_by_memory(candidates: list[DeviceClass], measured_bytes: int) -> DeviceClass:
    return min(candidates, key=lambda c: (abs(c.memory_bytes - measured_bytes), c.name))


def _largest_not_above(candidates: list[DeviceClass], measured_bytes: int) -> DeviceClass | None:
    fitting = [c for c in candidates if c.memory_bytes * (1 - MEMORY_TOLERANCE) <= measured_bytes]
    return max(fitting, key=lambda c: (c.memory_gib, c.name)) if fitting else None


def match_device_class(profile: DeviceProfile, catalog: Catalog, jetson_model: str = "") -> tuple[DeviceClass | None, str]:
    """The catalog class closest to a measured profile.

    Jetsons match by device-tree model (then memory, which tells AGX Orin 32 GB from 64 GB);
    CUDA boxes by GPU name (then GPU memory); CPU boxes by the largest class whose memory
    the machine has (so the plan never assumes memory that is not there). A GPU or Jetson
    the catalog does not name gets the closest class of its kind by memory.

    Args:
        profile: Measured profile.
        catalog: The catalog.
        jetson_model: Device-tree model string, if known.

    Returns:
        ``(class or None, reason)``.
    """
    if profile.is_jetson:
        jetsons = catalog.of_kind("jetson")
        if not jetsons:
            return None, "the catalog has no Jetson class"
        named = [c for c in jetsons if any(_mentions(jetson_model, m) for m in c.match_models)]
        if named:
            best = _closest_by_memory(named, profile.total_memory_bytes)
            return best, f"Jetson model {jetson_model!r} (memory {profile.total_memory_bytes / GIB:.1f} GiB)"
        if profile.total_memory_bytes:
            best = _closest_by_memory(jetsons, profile.total_memory_bytes)
            return best, f"unlisted Jetson {jetson_model!r}: closest Jetson class by memory"
        return None, f"unlisted Jetson {jetson_model!r} and memory unknown"
    if profile.accelerator == "cuda":
        gpus = catalog.of_kind("gpu")
        named = [c for c in gpus if any(_mentions(profile.gpu_name, m) for m in c.match_gpu_names)]
        if named:
            best = _closest_by_memory(named, profile.gpu_total_memory_bytes)
            return best, f"GPU name {profile.gpu_name!r}"
        if gpus and profile.gpu_total_memory_bytes:
            best = _largest_not_above(gpus, profile.gpu_total_memory_bytes) or gpus[0]
            return best, (
                f"GPU {profile.gpu_name!r} is not in the catalog: closest GPU class by memory "
                f"({profile.gpu_total_memory_bytes / GIB:.1f} GiB)"
            )
        return None, f"GPU {profile.gpu_name!r} is not in the catalog"
    cpus = catalog.of_kind("cpu")
    if not profile.total_memory_bytes:
        return None, "memory unknown (psutil unavailable): no CPU class can be chosen"
    best = _largest_not_above(cpus, profile.total_memory_bytes)
    if best is None:
        return None, f"{profile.total_memory_bytes / GIB:.1f} GiB is less than the smallest CPU class"
    return best, f"CPU-only, {profile.total_memory_bytes / GIB:.1f} GiB RAM: largest CPU class it has memory for"


def detect_hardware(
    *,
    override: str | None = None,
    catalog: Catalog | None = None,
    root: str | Path = "/",
    name: str | None = None,
) -> Detection:
    """Measure this machine and attach its catalog class.

    Args:
        override: A catalog class name that replaces the match (the user knows better).
        catalog: Catalog to match against (default: the shipped one).
        root: Filesystem root for the Jetson probe.
        name: Device name to report (default: the host name).

    Returns:
        The :class:`Detection`. ``profile.supports_4bit`` is the class's flag when a class
        is known and bitsandbytes is installed, otherwise a platform guess.

    Raises:
        ConfigError: ``override`` names no catalog class, or the catalog is invalid.
    """
    catalog = catalog if catalog is not None else load_catalog()
    profile, probes, jetson_model = measure_profile(root=root, name=name)
    if override:
        cls: DeviceClass | None = catalog.get(override)
        reason = "chosen by the user (override)"
    else:
        cls, reason = match_device_class(profile, catalog, jetson_model)
    if cls is not None:
        bnb = importlib.util.find_spec("bitsandbytes") is not None
        profile = replace(profile, device_class=cls.name, supports_4bit=cls.supports_4bit and bnb)
    log.debug("detected %s: %s (%s)", profile.name, profile.device_class, reason)
    return Detection(profile=profile, device_class=cls, match_reason=reason, probes=tuple(probes), jetson_model=jetson_model)


def detect_profile(*, override: str | None = None, catalog: Catalog | None = None, root: str | Path = "/") -> DeviceProfile:
    """The measured :class:`~shared.protocol.DeviceProfile` a client sends in its Hello.

    Args:
        override: Catalog class name to use instead of the detected one.
        catalog: Catalog (default: the shipped one).
        root: Filesystem root for the Jetson probe.

    Returns:
        The profile.

    Raises:
        ConfigError: ``override`` names no catalog class.
    """
    return detect_hardware(override=override, catalog=catalog, root=root).profile


def emulated_profile(
    limit_bytes: int,
    *,
    device_class: str | None = None,
    catalog: Catalog | None = None,
    root: str | Path = "/",
    name: str | None = None,
) -> DeviceProfile:
    """The profile of a client held to ``limit_bytes`` in all (``join --memory-limit``).

    It describes the device the client plays, on the machine it really runs on:

    * the class's capabilities: ``device_class`` is the named class (else the one this
      machine matches), and ``supports_4bit`` is the class's flag where bitsandbytes 4-bit
      also runs on this machine's CPU; the class's bf16 support and safety margin follow from
      its name (:func:`~hardware_profiles.budget.budget_for` looks them up);
    * this machine's accelerator, the CPU: the cap (``RLIMIT_DATA``) holds host memory only,
      so a capped client trains on the CPU, and its profile says so: ``accelerator = "cpu"``,
      no GPU fields, this machine's CPU count. ``unified_memory`` and ``is_jetson`` are False
      even for a Jetson class: unified memory is a CUDA device sharing the host's memory
      (:class:`~hardware_profiles.training_setup.TrainingSetup` refuses it on a CPU), and on
      a CPU the cap already holds everything the process allocates, as a Jetson's shared
      memory would;
    * memory capped at the limit: total and available memory are at most ``limit_bytes``,
      so the coordinator plans against ``limit * (1 - class margin)`` at most.

    Args:
        limit_bytes: The cap on the whole process (what :func:`edge_client.memory_cap.apply_memory_cap` applied).
        device_class: Catalog class to play; ``None``: the class this machine matches.
        catalog: Catalog (default: the shipped one).
        root: Filesystem root for the Jetson probe.
        name: Device name to report (default: the host name).

    Returns:
        The profile a capped client sends in its Hello and re-measures for its preflight.

    Raises:
        ConfigError: ``device_class`` names no catalog class.
    """
    detection = detect_hardware(override=device_class, catalog=catalog, root=root, name=name)
    measured, cls = detection.profile, detection.device_class
    cpu_4bit = _bitsandbytes_4bit_likely("cpu", is_jetson=False)
    return replace(
        measured,
        accelerator="cpu",
        total_memory_bytes=min(measured.total_memory_bytes, limit_bytes),
        available_memory_bytes=min(measured.available_memory_bytes, limit_bytes),
        unified_memory=False,
        gpu_name="",
        gpu_total_memory_bytes=0,
        gpu_free_memory_bytes=0,
        compute_capability="",
        supports_4bit=(cls.supports_4bit if cls is not None else True) and cpu_4bit,
        is_jetson=False,
    )


def process_rss_bytes() -> int:
    """Current resident set of this process (0 when it cannot be read)."""
    try:
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)
    except Exception:  # noqa: BLE001 - a missing psutil only removes a correction
        return 0
