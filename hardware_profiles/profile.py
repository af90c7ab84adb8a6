"""The device catalog: one TOML file per device class, loaded strictly into frozen dataclasses.

A *device class* is a kind of machine people run a fedsoda client on (a Jetson Orin Nano, an
RTX 3060 box, a CPU-only laptop with 16 GB). Its figures come from vendor datasheets (each file
cites them) and feed two decisions made before anything is downloaded:

* memory: how many bytes a training run may use there (:meth:`DeviceClass.budget_bytes`):
  the memory training allocations live in, minus what the OS / desktop / carve-outs keep
  (``reserved_gib``), minus a safety margin for what estimates cannot see;
* time: a sustained training throughput (``sustained_tflops``) for planning round deadlines.

Files live in ``hardware_profiles/catalog/`` (and any extra folder a user passes). Loading is
strict (:func:`shared.config.load_config`): an unknown, missing or mistyped key is an error
naming the file and the key, and a file's ``name`` must equal its stem, so a class is found by
its file name.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from shared.config import load_config
from shared.errors import ConfigError

GIB = 1 << 30
"""Bytes in one GiB (the catalog's memory unit)."""

CATALOG_DIR = Path(__file__).resolve().parent / "catalog"
"""The catalog shipped with fedsoda."""

DeviceKind = Literal["jetson", "gpu", "cpu"]
Accelerator = Literal["cuda", "cpu"]

_NAME_RE = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
_CC_RE = re.compile(r"^\d+\.\d+$")


@dataclass(frozen=True)
class DeviceClass:
    """One catalog entry: a class of device and the figures planning needs.

    Attributes:
        name: Identifier, lower-case words joined by ``-``; equals the TOML file's stem.
        display_name: Human-readable name.
        kind: ``jetson`` (NVIDIA Jetson module), ``gpu`` (discrete CUDA card) or ``cpu``.
        accelerator: Where training runs: ``cuda`` or ``cpu``.
        memory_gib: Memory the training tensors live in: the card's VRAM for a discrete GPU,
            the shared LPDDR for a Jetson, system RAM for a CPU box (GiB).
        unified_memory: CPU and GPU share ``memory_gib`` (Jetson). Then the process's host
            side (Python, torch, data) competes with the GPU tensors for the same bytes.
        system_memory_gib: Typical host RAM (equals ``memory_gib`` on unified / CPU devices).
        reserved_gib: Part of ``memory_gib`` that is never ours: firmware carve-outs, the OS
            and desktop (unified / CPU), the display and driver (discrete GPU).
        safety_margin: Fraction of the remaining memory kept free for what the estimate cannot
            see (allocator fragmentation, other processes), in ``[0, 0.9)``.
        compute_capability: CUDA compute capability (``"8.7"``), ``""`` for CPU classes.
        supports_4bit: Whether bitsandbytes' prebuilt wheel runs 4-bit (NF4) layers here.
        supports_bf16: Whether bfloat16 is a native, fast compute type here.
        peak_tflops: Datasheet dense peak for the training compute type (FP16/BF16 tensor
            cores with FP32 accumulate on GPUs, FP32 FMA on CPUs).
        sustained_tflops: Planning figure for LoRA training throughput (FLOP/s that a
            training step really achieves), used to size round deadlines.
        memory_bandwidth_gbps: Datasheet memory bandwidth (GB/s).
        cpu_cores: Typical number of CPU cores.
        match_gpu_names: Substrings of ``torch.cuda.get_device_name()`` that identify it.
        match_models: Substrings of the Jetson device-tree model that identify it.
        notes: Caveats (why a flag is set, what is approximate).
        sources: Where the figures come from (datasheets, issues).
    """

    name: str
    display_name: str
    kind: DeviceKind
    accelerator: Accelerator
    memory_gib: float
    unified_memory: bool
    system_memory_gib: float
    reserved_gib: float
    safety_margin: float
    compute_capability: str
    supports_4bit: bool
    supports_bf16: bool
    peak_tflops: float
    sustained_tflops: float
    memory_bandwidth_gbps: float
    cpu_cores: int
    match_gpu_names: tuple[str, ...] = ()
    match_models: tuple[str, ...] = ()
    notes: str = ""
    sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        problems = []
        if not _NAME_RE.match(self.name):
            problems.append(f"name {self.name!r} must be lower-case words joined by '-'")
        if self.memory_gib <= 0:
            problems.append(f"memory_gib must be > 0, got {self.memory_gib}")
        if not 0 <= self.reserved_gib < self.memory_gib:
            problems.append(f"reserved_gib must be in [0, memory_gib={self.memory_gib}), got {self.reserved_gib}")
        if not 0 <= self.safety_margin < 0.9:
            problems.append(f"safety_margin must be in [0, 0.9), got {self.safety_margin}")
        if self.system_memory_gib <= 0:
            problems.append(f"system_memory_gib must be > 0, got {self.system_memory_gib}")
        if self.peak_tflops <= 0 or self.sustained_tflops <= 0:
            problems.append("peak_tflops and sustained_tflops must be > 0")
        elif self.sustained_tflops > self.peak_tflops:
            problems.append(f"sustained_tflops {self.sustained_tflops} exceeds peak_tflops {self.peak_tflops}")
        if self.memory_bandwidth_gbps <= 0:
            problems.append("memory_bandwidth_gbps must be > 0")
        if self.cpu_cores < 1:
            problems.append(f"cpu_cores must be >= 1, got {self.cpu_cores}")
        if self.accelerator == "cuda":
            if not _CC_RE.match(self.compute_capability):
                problems.append(f"compute_capability must look like '8.6' for a CUDA class, got {self.compute_capability!r}")
            if self.kind == "cpu":
                problems.append("kind 'cpu' needs accelerator 'cpu'")
        else:
            if self.compute_capability:
                problems.append("a CPU class has no compute_capability (use \"\")")
            if self.kind != "cpu":
                problems.append(f"kind {self.kind!r} needs accelerator 'cuda'")
        if self.kind == "jetson" and not self.unified_memory:
            problems.append("a Jetson shares its memory between CPU and GPU: set unified_memory = true")
        if self.kind == "gpu" and self.unified_memory:
            problems.append("a discrete GPU has its own memory: set unified_memory = false")
        if self.unified_memory and self.system_memory_gib != self.memory_gib:
            problems.append("with unified_memory, system_memory_gib must equal memory_gib")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def memory_bytes(self) -> int:
        """``memory_gib`` in bytes."""
        return int(self.memory_gib * GIB)

    @property
    def reserved_bytes(self) -> int:
        """``reserved_gib`` in bytes."""
        return int(self.reserved_gib * GIB)

    @property
    def usable_bytes(self) -> int:
        """Memory a client process of this class may hold in all: ``memory - reserved`` (bytes).

        What ``simulate --profiles CLASS`` caps an emulated client at when no size is given.
        """
        return self.memory_bytes - self.reserved_bytes

    def budget_bytes(self) -> int:
        """Bytes a training run may use on this class: ``(memory - reserved) * (1 - margin)``."""
        return int(self.usable_bytes * (1.0 - self.safety_margin))


class Catalog:
    """The loaded device classes, by name, in a stable (sorted) order.

    Args:
        classes: The entries; names must be unique.

    Raises:
        ConfigError: Two entries share a name.
    """

    def __init__(self, classes: Iterable[DeviceClass]) -> None:
        by_name: dict[str, DeviceClass] = {}
        for cls in classes:
            if cls.name in by_name:
                raise ConfigError(f"device class {cls.name!r} is defined twice in the catalog")
            by_name[cls.name] = cls
        self._by_name = dict(sorted(by_name.items()))

    def __iter__(self) -> Iterator[DeviceClass]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        """Class names, sorted."""
        return list(self._by_name)

    def get(self, name: str) -> DeviceClass:
        """The class called ``name``.

        Raises:
            ConfigError: No such class (the message lists the known ones).
        """
        try:
            return self._by_name[name]
        except KeyError:
            raise ConfigError(
                f"unknown device class {name!r}; known classes: {', '.join(self.names)} "
                "(add one as a TOML file in hardware_profiles/catalog/)"
            ) from None

    def of_kind(self, kind: DeviceKind) -> list[DeviceClass]:
        """Classes of one kind, smallest memory first."""
        return sorted((c for c in self if c.kind == kind), key=lambda c: (c.memory_gib, c.name))


def load_device_class(path: str | Path) -> DeviceClass:
    """Load and validate one catalog file.

    Args:
        path: A ``.toml`` file whose top-level keys are :class:`DeviceClass` fields.

    Returns:
        The device class.

    Raises:
        ConfigError: The file is missing or not TOML, a key is unknown, missing or of the
            wrong type, a value is out of range, or ``name`` differs from the file stem. The
            message names the file and every bad key.
    """
    path = Path(path)
    # env={}: FEDSODA_* variables configure runs, never catalog entries.
    try:
        cls = load_config(DeviceClass, path, env={})
    except ConfigError as exc:
        raise ConfigError(f"device catalog file {path}: {exc}") from None
    if cls.name != path.stem:
        raise ConfigError(f"device catalog file {path}: name {cls.name!r} must equal the file name {path.stem!r}")
    return cls


def load_catalog(directories: Sequence[str | Path] | None = None) -> Catalog:
    """Load every ``*.toml`` device class from the shipped catalog and extra folders.

    Args:
        directories: Folders to read, in order; ``None`` reads :data:`CATALOG_DIR` only. Pass
            ``[CATALOG_DIR, my_dir]`` to add classes of your own.

    Returns:
        The catalog.

    Raises:
        ConfigError: A folder is missing or holds no class, or a file is invalid (every
            invalid file is reported, each with its problems).
    """
    folders = [Path(d) for d in (directories if directories is not None else [CATALOG_DIR])]
    classes: list[DeviceClass] = []
    errors: list[str] = []
    for folder in folders:
        if not folder.is_dir():
            errors.append(f"device catalog folder {folder} does not exist")
            continue
        files = sorted(folder.glob("*.toml"))
        if not files:
            errors.append(f"device catalog folder {folder} holds no *.toml file")
        for file in files:
            try:
                classes.append(load_device_class(file))
            except ConfigError as exc:
                errors.append(str(exc))
    if errors:
        raise ConfigError("\n".join(errors))
    return Catalog(classes)
