"""Checking the coordinator's memory estimate against the machine before any weight is loaded.

:func:`preflight` is what ``prune`` / ``serve`` / ``simulate`` call: it estimates the workload
(:func:`coordinator.model.footprint.estimate_coordinator_memory`), prints the estimate, and
refuses a workload that cannot fit with an error that says what would (:func:`check_fits`:
each smaller setting is estimated, not guessed). Kept apart from the estimate itself, which is
pure arithmetic on a config and has no notion of the machine it runs on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from coordinator.model.footprint import (
    CoordinatorEstimate,
    CoordinatorWorkload,
    estimate_coordinator_memory,
)
from hardware_profiles.memory import describe_bytes
from shared.errors import ConfigError, InsufficientMemoryError


def available_memory(device: str) -> int:
    """Bytes the coordinator can use now on ``device``.

    Args:
        device: ``cpu`` (psutil's available RAM) or ``cuda`` / ``cuda:N`` (the GPU's free
            memory from ``torch.cuda.mem_get_info``).

    Returns:
        Available bytes.

    Raises:
        ConfigError: CUDA asked for but not available, or an unknown device.
    """
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("the coordinator was asked to run on CUDA but torch sees no GPU")
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    raise ConfigError(f"unknown device {device!r}: expected 'cpu' or 'cuda'")


def _alternatives(workload: CoordinatorWorkload) -> list[tuple[str, str, CoordinatorWorkload]]:
    """Smaller workloads to suggest as ``(kind, label, workload)``, each changing one thing.

    Within a kind the larger (less degrading) setting comes first.
    """
    w = workload
    out: list[tuple[str, str, CoordinatorWorkload]] = []
    batch = w.calibration_batch_size
    while batch > 1:
        batch //= 2
        smaller = replace(
            w,
            calibration_batch_size=batch,
            oda_batch_size=min(w.resolved_oda_batch_size, batch),
            eval_batch_size=min(w.resolved_eval_batch_size, batch),
        )
        out.append(("batch", f"calibration batch size {batch}", smaller))
    seq = w.seq_len
    while seq > 16:
        seq //= 2
        out.append(("seq", f"sequence length {seq}", replace(w, seq_len=seq, eval_seq_len=min(w.resolved_eval_seq_len, seq))))
    chunk = w.kl_chunk_tokens
    while chunk > 128:
        chunk //= 2
        out.append(("chunk", f"KL / NLL chunks of {chunk} tokens (prune --chunk-tokens {chunk}, or alignment.chunk_tokens = {chunk} in the run config)", replace(w, kl_chunk_tokens=chunk)))
    if w.align_layers == "all":
        out.append(("align", "bridge-only alignment (--align-layers bridge)", replace(w, align_layers="bridge")))
    if not w.gradient_checkpointing:
        out.append(("checkpointing", "gradient checkpointing", replace(w, gradient_checkpointing=True)))
    if w.dtype == "fp32":
        out.append(("dtype", "bf16 weights", replace(w, dtype="bf16")))
    return out


def check_fits(estimate: CoordinatorEstimate, available_bytes: int, what: str = "RAM") -> None:
    """Refuse a workload that does not fit, saying by how much and what would fit.

    Args:
        estimate: From :func:`estimate_coordinator_memory`.
        available_bytes: Memory the coordinator may use (:func:`available_memory`).
        what: Name of that memory in the message (``RAM``, ``GPU memory``).

    Raises:
        InsufficientMemoryError: The estimate exceeds ``available_bytes``. The message names
            the shortfall, the changes (computed, with their estimates) that would fit, and
            where the work could run instead (a GPU, or CPU offload).
    """
    if estimate.total <= available_bytes:
        return
    shape, w = estimate.shape, estimate.workload
    kinds: dict[str, str] = {}
    tried = []
    for kind, label, alternative in _alternatives(w):
        alt = estimate_coordinator_memory(shape, alternative)
        tried.append((label, alt.total))
        # The first setting of a kind that fits is the least degrading one: keep only it.
        if alt.total <= available_bytes and kind not in kinds:
            kinds[kind] = f"{label} would need {describe_bytes(alt.total)}"
    on_gpu = estimate_coordinator_memory(shape, replace(w, device="cuda", dtype="bf16" if w.dtype == "fp32" else w.dtype))
    elsewhere = f"a GPU with about {describe_bytes(on_gpu.total)} free ({on_gpu.workload.dtype})" if w.device == "cpu" else (
        f"CPU offload (run on the CPU: about {describe_bytes(estimate_coordinator_memory(shape, replace(w, device='cpu')).total)} of RAM)"
    )
    message = (
        f"{estimate.describe()}, but only {describe_bytes(available_bytes)} of {what} is available "
        f"(short by {describe_bytes(estimate.total - available_bytes)}). "
    )
    if kinds:
        message += "What would fit: " + "; ".join(kinds.values()) + f". Or run on {elsewhere}."
    else:
        floor = estimate.breakdown["framework"] + estimate.breakdown["full_model"]
        smallest = min(tried, key=lambda t: t[1]) if tried else None
        message += (
            f"No smaller calibration batch, sequence or alignment fits: the framework and the full model alone need "
            f"{describe_bytes(floor)}"
            + (f" and the smallest setting tried ({smallest[0]}) {describe_bytes(smallest[1])}" if smallest else "")
            + f". Run on {elsewhere}, or pick a machine with more {what}."
        )
    raise InsufficientMemoryError(message)


def preflight(config_or_path: Any, workload: CoordinatorWorkload, say: Any = None) -> CoordinatorEstimate:
    """Estimate a workload, tell the user, and refuse it before any weight is loaded if it cannot fit.

    Args:
        config_or_path: The full model's config, config.json or folder.
        workload: What the coordinator will run.
        say: Receives the one-line estimate (``prune`` / ``serve`` print it).

    Returns:
        The estimate.

    Raises:
        InsufficientMemoryError: See :func:`check_fits`; measured against :func:`available_memory`.
    """
    estimate = estimate_coordinator_memory(config_or_path, workload)
    available = available_memory(workload.device)
    if say is not None:
        say(f"{estimate.describe()}; {describe_bytes(available)} available")
    check_fits(estimate, available, "GPU memory" if workload.device == "cuda" else "RAM")
    return estimate
