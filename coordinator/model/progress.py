"""Where the model side's long steps (SGP, ODA, perplexity, packaging) report progress.

Library code stays silent (it only logs) and reports through a :class:`ProgressSink`; the
command line decides how to show it: a rich progress bar on a terminal, one line per step
and every tenth of it in a log file (:class:`LineSink`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

Advance = Callable[[int], None]
"""Advances the step it came from by n units of work."""


class ProgressSink(Protocol):
    """Receives the long steps as they start, and their advance."""

    def start(self, description: str, total: int) -> Advance:
        """Open a step.

        Args:
            description: What the step does (one line).
            total: Units of work in the step.

        Returns:
            A function that advances the step by n units.
        """
        ...


class LogSink:
    """Logs each step at INFO as it starts; advances are not shown (the library's default)."""

    def start(self, description: str, total: int) -> Advance:
        """See :meth:`ProgressSink.start`."""
        log.info("%s (%d steps)", description, total)
        return lambda n: None


class LineSink:
    """Prints one line when a step starts and one at every tenth of it, with the elapsed time.

    For output that is not a terminal (a log file, CI, a pipe), where a progress bar shows
    nothing until it is done.

    Args:
        emit: Takes one line of text.
        clock: Seconds (injectable for tests).
    """

    def __init__(self, emit: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._clock = clock

    def start(self, description: str, total: int) -> Advance:
        """See :meth:`ProgressSink.start`."""
        started = self._clock()
        self._emit(f"{description} ({total} steps)")
        done = 0
        shown = 0

        def advance(n: int) -> None:
            nonlocal done, shown
            done += n
            tenth = (10 * done) // total if total > 0 else 10
            if tenth > shown and done <= total:
                shown = tenth
                self._emit(f"{description}: {done}/{total} ({self._clock() - started:.0f} s)")

        return advance
