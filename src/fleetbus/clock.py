"""Time, behind an interface so that tests and fault runs can move it.

The broker reads wall time for anything stored or shown (grant times, TTL
expiries) and monotonic time for leases, which never survive a restart.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    """Where fleetbus reads the time."""

    def wall(self) -> float:
        """Seconds since the epoch, as stored and shown."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back, for leases and timeouts."""


class SystemClock:
    """The real clocks of the machine."""

    def wall(self) -> float:
        """``time.time()``."""
        return time.time()

    def monotonic(self) -> float:
        """``time.monotonic()``."""
        return time.monotonic()


class OffsetClock(SystemClock):
    """The system clocks shifted by offsets that can be changed at run time.

    Used by the broker's fault-injection hooks to jump time in a real process.
    """

    def __init__(self) -> None:
        self.wall_offset = 0.0
        self.monotonic_offset = 0.0

    def wall(self) -> float:
        """The system's wall time plus ``wall_offset``."""
        return time.time() + self.wall_offset

    def monotonic(self) -> float:
        """The system's monotonic time plus ``monotonic_offset``."""
        return time.monotonic() + self.monotonic_offset
