"""One process of the soak test: many sessions claiming and publishing.

Run as ``python -m tests.faults.soak_client URL COUNT SECONDS SEED OUT``. Each
of COUNT sessions loops until SECONDS have passed: claim a random file, now
and then publish a fact on it, hold it briefly, release it. The process
writes its counts, latencies and acknowledged fact ids to OUT as JSON.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from pathlib import Path

import orjson

from fleetbus.client import AsyncSession
from fleetbus.errors import Conflict, FleetbusError
from fleetbus.repo import RepoInfo

REPO = "soak-repo"
FILES = 4000


class Stats:
    """Counts and latencies of one process."""

    def __init__(self) -> None:
        self.latency: dict[str, list[float]] = {}
        self.counts: dict[str, int] = {}
        self.facts: list[str] = []
        self.fences: list[int] = []

    def time(self, op: str, seconds: float) -> None:
        """Record one latency of ``op``."""
        self.latency.setdefault(op, []).append(seconds)

    def count(self, what: str) -> None:
        """Count one ``what``."""
        self.counts[what] = self.counts.get(what, 0) + 1


async def session_loop(
    url: str, root: Path, name: str, deadline: float, rng: random.Random, stats: Stats
) -> None:
    """One session's life. The first of each process keeps a replica, so the
    broker fans every claims event out to a subscriber per process."""
    session = await AsyncSession.connect(
        url,
        repo=RepoInfo(id=REPO, root=root, branch=None),
        session_id=name,
        replica=name.endswith("-0"),
        timeout=10.0,
    )
    try:
        while time.monotonic() < deadline:
            await one_cycle(session, rng, stats)
    finally:
        await session.close()


async def one_cycle(session: AsyncSession, rng: random.Random, stats: Stats) -> None:
    """Claim a random file, maybe publish on it, hold it, release it."""
    path = f"src/m{rng.randrange(FILES)}.py"
    started = time.perf_counter()
    try:
        grant = await session.claim(path, intent="soak")
    except Conflict:
        stats.time("claim", time.perf_counter() - started)
        stats.count("conflict")
        await asyncio.sleep(rng.uniform(0.1, 0.3))
        return
    except FleetbusError as exc:
        stats.count(f"error.{exc.code}")
        await asyncio.sleep(0.5)
        return
    stats.time("claim", time.perf_counter() - started)
    stats.count("granted")
    stats.fences.append(grant.fence)
    if rng.random() < 0.2:
        started = time.perf_counter()
        try:
            fact = await session.publish(path, text=f"soak note {rng.getrandbits(40)}")
        except FleetbusError as exc:
            stats.count(f"error.{exc.code}")
        else:
            stats.time("publish", time.perf_counter() - started)
            stats.facts.append(fact.id)
    await asyncio.sleep(rng.uniform(0.2, 0.8))
    started = time.perf_counter()
    try:
        await session.release(grant=grant.id)
    except FleetbusError as exc:
        stats.count(f"error.{exc.code}")
        return
    stats.time("release", time.perf_counter() - started)
    stats.count("released")


async def main_async(
    url: str, count: int, seconds: float, seed: int, out: Path
) -> None:
    """Run ``count`` sessions until ``seconds`` pass; write the figures."""
    stats = Stats()
    deadline = time.monotonic() + seconds
    root = out.parent
    loops = [
        session_loop(
            url, root, f"p{seed}-{n}", deadline, random.Random(seed * 1000 + n), stats
        )
        for n in range(count)
    ]
    results = await asyncio.gather(*loops, return_exceptions=True)
    failures = [repr(r) for r in results if isinstance(r, BaseException)]
    out.write_bytes(
        orjson.dumps(
            {
                "counts": stats.counts,
                "latency": stats.latency,
                "facts": stats.facts,
                "fences": stats.fences,
                "failures": failures,
            }
        )
    )


def main(argv: list[str] | None = None) -> int:
    """Run one soak process."""
    url, count, seconds, seed, out = argv or sys.argv[1:]
    asyncio.run(main_async(url, int(count), float(seconds), int(seed), Path(out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
