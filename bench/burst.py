"""One burst from a publisher to subscriber processes, counted at the far end.

Subscribers (``bench.children zsub``) say ready once warm-up messages reach
every socket; the publisher then sends the data and an end mark, and each
subscriber reports what it received between its first datum and the end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench.harness import Child, bench_child

WARMUP_EVERY_S = 0.02
READY_LIMIT_S = 30.0


def start_subscribers(
    url: str, topic: bytes, sockets: int, processes: int, limit_s: float
) -> list[Child]:
    """``processes`` children holding ``sockets`` SUB sockets between them."""
    share = [sockets // processes + (i < sockets % processes) for i in range(processes)]
    return [bench_child("zsub", url, topic.hex(), str(n), str(limit_s)) for n in share]


def warm(subscribers: list[Child], send_warmup: Callable[[], None]) -> None:
    """Send warm-up messages until every subscriber says it is ready."""
    waiting = list(subscribers)
    deadline = time.monotonic() + READY_LIMIT_S
    while waiting:
        if time.monotonic() > deadline:
            raise TimeoutError("subscribers did not get the warm-up in time")
        send_warmup()
        still = []
        for child in waiting:
            try:
                child.read(timeout=WARMUP_EVERY_S / len(waiting))
            except TimeoutError:
                still.append(child)
        waiting = still


def collect(subscribers: list[Child], limit_s: float) -> tuple[int, float]:
    """Total deliveries and the window they took, from every subscriber."""
    received = 0
    first, last = float("inf"), 0.0
    try:
        for child in subscribers:
            report = child.read(timeout=limit_s + 10)
            received += int(report["received"])
            if report["received"]:
                first = min(first, float(report["first"]))
                last = max(last, float(report["last"]))
    finally:
        for child in subscribers:
            child.stop()
    return received, max(last - first, 1e-9)


def deliveries_per_s(
    subscribers: list[Child],
    send_warmup: Callable[[], None],
    send_burst: Callable[[], None],
    limit_s: float,
) -> float:
    """Warm ``subscribers`` up, send the burst and its end mark, and collect.

    The subscribers are stopped if warming up or sending fails.
    """
    try:
        warm(subscribers, send_warmup)
        send_burst()
    except BaseException:
        for child in subscribers:
            child.stop()
        raise
    received, window = collect(subscribers, limit_s)

    return received / window
