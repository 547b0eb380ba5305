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


class ManualClock:
    """A clock that moves only when told to; for tests and injected jumps."""

    def __init__(self, wall: float = 1_700_000_000.0, monotonic: float = 1000.0):
        self._wall = wall
        self._monotonic = monotonic

    def wall(self) -> float:
        """The wall time as last set."""
        return self._wall

    def monotonic(self) -> float:
        """The monotonic time as last set."""
        return self._monotonic

    def advance(self, seconds: float) -> None:
        """Move both clocks forward together."""
        self._wall += seconds
        self._monotonic += seconds

    def jump_wall(self, seconds: float) -> None:
        """Move the wall clock alone, forward or back, as NTP might."""
        self._wall += seconds


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
