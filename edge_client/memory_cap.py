"""A real memory cap on the client process (``fedsoda-client join --memory-limit SIZE``).

``SIZE`` means "this process may use SIZE in all". :func:`apply_memory_cap` makes the kernel
hold it to that with ``setrlimit(RLIMIT_DATA)``: since Linux 4.7 ``RLIMIT_DATA`` counts the heap
and every private writable mapping, which is where Python, glibc ``malloc`` and torch's CPU
allocator put what they allocate, so the process's ``VmData`` follows its resident set closely
during training. ``RLIMIT_AS`` would be the wrong limit: it also counts the mapped text of
torch and its libraries (about 1 GB of address space that is mostly never resident) and would
refuse far below the size asked for.

With the cap in place an allocation beyond it fails in the process itself (torch raises
``RuntimeError: ... can't allocate memory``, Python ``MemoryError``) instead of the machine
swapping or another process being killed. :func:`out_of_memory_guard` turns such a failure
during fetch, load or training into an :class:`~shared.errors.InsufficientMemoryError` that
says it ran out of memory under the cap and what the plan estimated, so a wrong estimate
shows up as a clear error, never as silent success on a bigger machine.

Only host memory is capped: GPU memory is not counted by ``RLIMIT_DATA``, which is why a
capped client trains on the CPU (:func:`hardware_profiles.detect.emulated_profile`).
"""

from __future__ import annotations

import errno
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hardware_profiles.memory import describe_bytes
from shared.errors import ConfigError, InsufficientMemoryError

log = logging.getLogger(__name__)

_STATUS_FILE = Path("/proc/self/status")

#: Messages of allocation failures: torch's CPU allocator ("DefaultCPUAllocator: can't allocate
#: memory"), ENOMEM's strerror as OSError, safetensors and mmap report it, and CUDA's
#: "out of memory" (should a GPU run out where a cap is not the cause).
_OUT_OF_MEMORY_WORDS = ("can't allocate memory", "cannot allocate memory", "out of memory")


def data_in_use_bytes() -> int:
    """What ``RLIMIT_DATA`` counts for this process now: its ``VmData`` (bytes).

    Raises:
        ConfigError: ``/proc/self/status`` has no readable ``VmData`` line (not Linux).
    """
    try:
        for line in _STATUS_FILE.read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024  # "VmData:   221540 kB"
    except (OSError, ValueError, IndexError) as exc:
        raise ConfigError(f"cannot read this process's VmData from {_STATUS_FILE}: {exc}") from None
    raise ConfigError(f"{_STATUS_FILE} has no VmData line: the memory cap needs Linux")


def _rlimit_data() -> int:
    """The ``RLIMIT_DATA`` resource id, where the kernel enforces it."""
    try:
        import resource
    except ImportError:  # Windows
        resource = None  # type: ignore[assignment]
    # macOS defines RLIMIT_DATA but does not count mmap()ed memory, where large allocations go:
    # the cap would hold nothing there, so it is refused rather than pretended.
    if resource is None or not hasattr(resource, "RLIMIT_DATA") or not sys.platform.startswith("linux"):
        raise ConfigError(
            f"a memory cap needs Linux's RLIMIT_DATA, which this platform ({sys.platform}) does not enforce; "
            "run without --memory-limit"
        )
    return resource.RLIMIT_DATA


def apply_memory_cap(limit_bytes: int) -> int:
    """Hold this whole process to ``limit_bytes`` of memory from now on (``RLIMIT_DATA``).

    Both the soft and the hard limit are set, so nothing in the process can lift the cap
    again. A tighter limit already in force (``ulimit -d``) is kept.

    Args:
        limit_bytes: The most the process may use in all (heap and private writable mappings).

    Returns:
        The cap applied: ``limit_bytes``, or the tighter limit already in force.

    Raises:
        ConfigError: ``limit_bytes`` is not positive, or the platform has no enforced
            ``RLIMIT_DATA`` (only Linux has).
        InsufficientMemoryError: The process already uses at least that much (both numbers
            in the message).
    """
    import resource

    if limit_bytes <= 0:
        raise ConfigError(f"a memory cap must be more than 0 bytes, got {limit_bytes}")
    rlimit = _rlimit_data()
    soft, hard = resource.getrlimit(rlimit)
    applied = min([limit_bytes] + [v for v in (soft, hard) if v != resource.RLIM_INFINITY])
    in_use = data_in_use_bytes()
    if applied <= in_use:
        tighter = f" (the limit already in force is {describe_bytes(applied)})" if applied < limit_bytes else ""
        raise InsufficientMemoryError(
            f"memory cap of {describe_bytes(limit_bytes)}{tighter} is below the {describe_bytes(in_use)} this process "
            "already uses (its VmData: Python, torch and their libraries' data, which the cap counts): "
            "give it more than that"
        )
    resource.setrlimit(rlimit, (applied, applied))
    log.debug("memory cap %s applied (RLIMIT_DATA); %s in use", describe_bytes(applied), describe_bytes(in_use))
    return applied


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc``, or an error it was raised from, is an allocation failure.

    The chain is followed because loaders wrap what they catch (``load_package`` turns torch's
    RuntimeError into a ModelError, transformers an OSError into another).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, MemoryError):
            return True
        if isinstance(current, OSError) and current.errno == errno.ENOMEM:
            return True
        text = str(current).lower()
        if any(words in text for words in _OUT_OF_MEMORY_WORDS):
            return True
        current = current.__cause__ or current.__context__
    return False


def out_of_memory_message(what: str, limit_bytes: int | None, estimate_bytes: int | None, exc: BaseException) -> str:
    """One line saying what ran out of memory, under which cap, against which estimate."""
    cap = f" under the {describe_bytes(limit_bytes)} memory cap (--memory-limit)" if limit_bytes else ""
    planned = f"; the plan estimated {describe_bytes(estimate_bytes)}" if estimate_bytes else ""
    if not limit_bytes:
        advice = "free memory (close other programs) or ask the coordinator for a smaller tier"
    elif estimate_bytes and estimate_bytes > limit_bytes:
        advice = "the cap is below the plan's estimate: raise --memory-limit or ask the coordinator for a smaller tier"
    else:  # a plan the coordinator fitted to the cap: it under-estimated this run
        advice = "the estimate is too low for this run: raise --memory-limit or ask the coordinator for a smaller tier"
    detail = " ".join(str(exc).split())[:300] or type(exc).__name__
    return f"ran out of memory while {what}{cap}{planned}: {advice} ({detail})"


@contextmanager
def out_of_memory_guard(what: str, *, limit_bytes: int | None, estimate_bytes: int | None) -> Iterator[None]:
    """Turn an allocation failure inside the block into an :class:`InsufficientMemoryError`.

    Args:
        what: What the block does, for the message (``"training round 3"``).
        limit_bytes: The process's memory cap, ``None`` when it runs without one.
        estimate_bytes: The plan's estimated peak, ``None`` when unknown.

    Raises:
        InsufficientMemoryError: The block failed to allocate (its message says what, the cap
            and the estimate); other errors pass through unchanged.
    """
    try:
        yield
    except InsufficientMemoryError:
        raise
    except Exception as exc:  # MemoryError included; anything else is re-raised as it was
        if not is_out_of_memory(exc):
            raise
        raise InsufficientMemoryError(out_of_memory_message(what, limit_bytes, estimate_bytes, exc)) from exc
