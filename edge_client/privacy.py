"""DP-FedAvg on the client: clip the round's delta, then add Gaussian noise.

The coordinator names the bound and the noise multiplier in the schedule
(``TrainingParams.dp_clip_norm``, ``dp_noise_multiplier``). The noise comes from the
operating system's randomness, never from the training seed: the coordinator knows that seed,
and noise it could regenerate would protect nothing.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch


def privatize(
    delta: Mapping[str, torch.Tensor], clip_norm: float, std: float, generator: torch.Generator | None = None
) -> tuple[dict[str, torch.Tensor], float]:
    """Clip ``delta`` to L2 norm ``clip_norm`` (over all its tensors) and add N(0, std^2) noise.

    Args:
        delta: The trained delta, key -> tensor.
        clip_norm: The bound (> 0).
        std: Noise standard deviation per coordinate.
        generator: Noise source; default a generator seeded from the OS's randomness.

    Returns:
        ``(the released delta in the input dtypes, the clip factor applied)``.
    """
    norm = math.sqrt(sum(float(t.detach().to(torch.float64).square().sum()) for t in delta.values()))
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    out: dict[str, torch.Tensor] = {}
    for key, tensor in delta.items():
        clipped = tensor.detach().to("cpu", torch.float32) * factor
        noise = torch.randn(clipped.shape, generator=generator, dtype=torch.float32) * std
        out[key] = (clipped + noise).to(tensor.dtype)
    return out, factor
