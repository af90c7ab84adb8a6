"""Will the assigned sub-LLM train in the memory this device really has now?

The coordinator plans from the profile a client sent at hello time; by the time the client
is about to download, other programs may have taken memory. The client re-measures and
re-checks the plan with the same estimator before it fetches a single chunk, and refuses
with the numbers when the tier no longer fits.
"""

from __future__ import annotations

from typing import Any

from hardware_profiles.assignment import MemoryCheck, check_plan
from hardware_profiles.detect import process_rss_bytes
from shared.protocol import DeviceProfile, Manifest


def preflight(
    manifest: Manifest, plan: dict[str, Any], profile: DeviceProfile, memory_limit_bytes: int | None = None
) -> MemoryCheck:
    """Re-check the coordinator's plan for this client against the memory available now.

    Args:
        manifest: The assigned tier's manifest (its meta carries the sub-LLM's model config).
        plan: The coordinator's plan for this client (``Assignment.plan``).
        profile: This device, measured just now.
        memory_limit_bytes: The cap this process runs under (``join --memory-limit``), if any.

    Returns:
        The verdict; when it does not fit, ``reason`` says what to do.
    """
    # This process already holds memory the estimate counts (Python, torch): add it back. Under
    # a cap that memory is inside the cap, so available + resident is held to the cap.
    check = check_plan(
        manifest.meta["model_config"], plan, profile,
        process_rss_bytes=process_rss_bytes(), memory_limit_bytes=memory_limit_bytes,
    )
    if check.fits:
        return check
    if memory_limit_bytes is not None:
        advice = "; raise --memory-limit or ask the coordinator for a smaller tier"
    else:
        advice = "; free memory (close other programs) or ask the coordinator for a smaller tier"
    return MemoryCheck(check.fits, check.estimate_bytes, check.budget_bytes, check.reason + advice)
