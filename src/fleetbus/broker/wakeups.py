"""When each repository next has timed work: a heap keyed by repository.

The broker asks, once per turn, how long it may sleep and which
repositories have leases, waits, TTLs or facts come due. Looking at every
repository for that made each turn cost more with every repository the
broker had ever served; a repository's due time is now set when its state
changes, and the earliest is read from a heap.
"""

from __future__ import annotations

import heapq


class Wakeups:
    """The next due time (monotonic seconds) of each key, earliest first.

    Setting a key again supersedes its entry; superseded entries are dropped
    as they come to the top.
    """

    __slots__ = ("_due", "_heap")

    def __init__(self) -> None:
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: str, due: float | None) -> None:
        """``key`` is next due at ``due``; ``None``: it has nothing timed."""
        if due is None:
            self._due.pop(key, None)
            return
        if self._due.get(key) == due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))

    def first(self) -> float | None:
        """The earliest due time, or ``None`` when no key has one."""
        heap = self._heap
        while heap:
            due, key = heap[0]
            if self._due.get(key) == due:
                return due
            heapq.heappop(heap)
        return None

    def pop_due(self, now: float) -> list[str]:
        """The keys due at or before ``now``, earliest first, taken out."""
        heap = self._heap
        keys = []
        while heap and heap[0][0] <= now:
            due, key = heapq.heappop(heap)
            if self._due.get(key) == due:
                del self._due[key]
                keys.append(key)
        return keys
