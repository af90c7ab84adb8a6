"""Memory budgets: what a device offers a training run, and which precisions it trains in.

:func:`budget_for` turns a catalog :class:`~hardware_profiles.profile.DeviceClass` (nominal
memory less reserved and margin) or a measured :class:`~shared.protocol.DeviceProfile` (memory
free now less the class's margin) into a :class:`Budget`; :func:`allowed_precisions` and
:func:`runnable_precisions` say which weight precisions to try there. The planner
(:mod:`hardware_profiles.planner`) and the assignment checks (:mod:`hardware_profiles.assignment`)
both start from a budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from hardware_profiles.memory import describe_bytes
from hardware_profiles.profile import Catalog, DeviceClass, load_catalog
from hardware_profiles.training_setup import Precision
from shared.errors import ConfigError
from shared.protocol import DeviceProfile

DEFAULT_SAFETY_MARGIN = 0.15
"""Margin for a measured profile whose class is unknown."""


@dataclass(frozen=True)
class Budget:
    """What a device offers a training run.

    Attributes:
        bytes: Memory the estimate must fit in (margin already taken off).
        device: ``cpu`` or ``cuda``.
        unified_memory: Host and GPU share the memory (Jetson).
        supports_4bit: bitsandbytes 4-bit runs there.
        supports_bf16: bfloat16 is native there.
        sustained_tflops: Planning throughput, ``None`` when unknown.
        source: Where the numbers come from, for messages.
    """

    bytes: int
    device: Literal["cpu", "cuda"]
    unified_memory: bool
    supports_4bit: bool
    supports_bf16: bool
    sustained_tflops: float | None
    source: str


def budget_for(
    device: DeviceClass | DeviceProfile,
    catalog: Catalog | None = None,
    *,
    process_rss_bytes: int = 0,
    memory_limit_bytes: int | None = None,
) -> Budget:
    """The memory budget of a catalog class (nominal) or a measured profile (now).

    A measured profile offers what is free now: free GPU memory on a discrete card, available
    RAM on a CPU box or a Jetson (whose GPU shares it), less the class's safety margin.

    Args:
        device: A catalog class or a measured profile.
        catalog: Catalog to look the profile's class up in (default: the shipped one).
        process_rss_bytes: Resident set of the calling process, added back to the available
            memory because the estimate already counts the whole process (pass it when a
            client checks its own assignment; 0 on the coordinator).
        memory_limit_bytes: A cap on the whole process's host memory
            (:mod:`edge_client.memory_cap`): the available memory plus ``process_rss_bytes``
            is held to it, since the process's own resident set is inside the cap too. The
            profile of a capped client already reports at most the cap as available, which
            is all the coordinator (no ``process_rss_bytes``) needs.

    Returns:
        The :class:`Budget`.
    """
    if isinstance(device, DeviceClass):
        return Budget(
            bytes=device.budget_bytes(),
            device=device.accelerator,
            unified_memory=device.unified_memory,
            supports_4bit=device.supports_4bit,
            supports_bf16=device.supports_bf16,
            sustained_tflops=device.sustained_tflops,
            source=f"catalog class {device.name}",
        )
    catalog = catalog if catalog is not None else load_catalog()
    cls = catalog.get(device.device_class) if device.device_class in catalog else None
    margin = cls.safety_margin if cls else DEFAULT_SAFETY_MARGIN
    if device.accelerator == "cuda" and not device.unified_memory:
        free = device.gpu_free_memory_bytes or (device.gpu_total_memory_bytes - (cls.reserved_bytes if cls else 0))
        what = "free GPU memory"
    else:
        free = device.available_memory_bytes + process_rss_bytes if device.available_memory_bytes else 0
        what = "available memory"
        if memory_limit_bytes is not None and free > memory_limit_bytes:
            free, what = memory_limit_bytes, "memory cap"
    if free <= 0 and cls is not None:
        return replace(budget_for(cls), source=f"catalog class {cls.name} ({what} of {device.name} unknown)")
    major = float(device.compute_capability) if device.compute_capability else 0.0
    return Budget(
        bytes=max(int(free * (1 - margin)), 0),
        device=device.accelerator,
        unified_memory=device.unified_memory,
        supports_4bit=device.supports_4bit,
        supports_bf16=cls.supports_bf16 if cls else major >= 8.0,
        sustained_tflops=cls.sustained_tflops if cls else None,
        source=f"{device.name} ({device.device_class}): {describe_bytes(free)} {what} less {margin:.0%} margin",
    )


def allowed_precisions(budget: Budget) -> tuple[Precision, ...]:
    """Precisions a device trains in by default, in order of preference.

    On a GPU: NF4 (QLoRA, the method's default) where bitsandbytes runs, otherwise the
    native half precision. On a CPU: fp32 first (fastest there, and bitsandbytes' CPU path
    dequantizes every weight for every matmul), then NF4 where it runs, else bf16, to fit
    deeper tiers.
    """
    if budget.device == "cuda":
        if budget.supports_4bit:
            return ("nf4",)
        return ("bf16",) if budget.supports_bf16 else ("fp16",)
    return ("fp32", "nf4") if budget.supports_4bit else ("fp32", "bf16")


def runnable_precisions(budget: Budget, wanted: Sequence[Precision] | None = None) -> list[Precision]:
    """The wanted precisions (or the device's defaults) that run on the device.

    Args:
        budget: The device's budget (its 4-bit and bf16 support).
        wanted: Precisions in order of preference; ``None`` or empty:
            :func:`allowed_precisions`.

    Returns:
        Those of the precisions tried that run there, in the same order.

    Raises:
        ConfigError: None of them runs there.
    """
    wanted = wanted or allowed_precisions(budget)
    quantized_ok = budget.supports_4bit
    half_ok = budget.device == "cpu" or budget.supports_bf16

    def runs(p: Precision) -> bool:
        if p in ("nf4", "int8"):
            return quantized_ok
        if p == "bf16":
            return half_ok
        return True  # fp16 runs on every CUDA GPU (and, slowly, on CPU); fp32 everywhere

    precisions = [p for p in wanted if runs(p)]
    if not precisions:
        raise ConfigError(
            f"none of the precisions {list(wanted)} runs on {budget.source} "
            f"(4-bit: {'yes' if budget.supports_4bit else 'no'}, bf16: {'yes' if budget.supports_bf16 else 'no'})"
        )
    return precisions
