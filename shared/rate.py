"""A token bucket: at most ``rate`` events a second sustained, ``burst`` at once.

The coordinator meters what a stranger or a hostile client could make it do without end with
these: chunk requests per client (``shared.blob_server``) and hellos (``coordinator.run.server``).
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` a second; each event takes one.

    Args:
        rate: Tokens added per second (> 0).
        burst: The bucket's size (>= 1); it starts full.
        clock: Monotonic seconds (tests pass their own).

    Raises:
        ValueError: A rate or burst no bucket can have.
    """

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and burst >= 1):
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, got {rate} and {burst}")
        self.rate, self.burst, self.clock = float(rate), float(burst), clock
        self._tokens = self.burst
        self._refilled_at = clock()

    def take(self) -> bool:
        """Take one token if the bucket holds one (refilled for the time passed first).

        Returns:
            True when the event may go ahead.
        """
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + max(0.0, now - self._refilled_at) * self.rate)
        self._refilled_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
