"""A broker holding a large state: joining it, its memory, restarting it.

The state is built through the wire protocol with many requests in flight
(sessions, claims in grants of 64 scopes, facts), then measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import zmq

from bench import raw
from bench.context import Run
from bench.harness import Broker, ask, rss_bytes
from bench.local import probe_paths, scope_text
from bench.sessions import open_session
from bench.stats import quantile
from fleetbus import wire

REPO = "bench:state"
MIB = 1024 * 1024
PUBLISHERS = 4
FACTS_LIMIT_S = 600
"""Bound on publishing the full run's 1,000,000 facts; the count built is
reported either way."""


@dataclass(frozen=True)
class Size:
    sessions: int
    claims: int
    facts: int

    def describe(self) -> str:
        return (
            f"{self.sessions:,} sessions, {self.claims:,} claims, {self.facts:,} facts"
        )


def build(broker: Broker, size: Size, facts_limit_s: float) -> dict[str, float]:
    """Fill ``broker`` with ``size``; seconds taken, facts stored and errors.

    Publishing facts stops after ``facts_limit_s`` seconds, whatever the count.
    """
    zctx = zmq.Context()
    client = raw.RawClient(zctx, broker.url)
    took: dict[str, float] = {}
    try:
        began = time.monotonic()
        client.pipeline(raw.hello(REPO, f"s{n}") for n in range(size.sessions))
        took["sessions_s"] = time.monotonic() - began
        began = time.monotonic()
        client.pipeline(_claims(size))
        took["claims_s"] = time.monotonic() - began
        # Several DEALERs, each a peer with its own rate limit, so that the
        # broker and not the limit bounds how fast the facts go in.
        publishers = [raw.RawClient(zctx, broker.url) for _ in range(PUBLISHERS)]
        began = time.monotonic()
        try:
            replies = raw.pump(
                [
                    (publisher, _facts(size, n, len(publishers)))
                    for n, publisher in enumerate(publishers)
                ],
                timeout_s=facts_limit_s,
            )
        finally:
            for publisher in publishers:
                publisher.close()
        took["facts_s"] = time.monotonic() - began
        refused = sum(publisher.errors for publisher in publishers)
        took["facts"] = replies - refused
        took["errors"] = client.errors + refused
    finally:
        client.close()
        zctx.term()
    return took


def _facts(size: Size, first: int, step: int) -> Any:
    """Every ``step``-th fact of the state from ``first``, each on its own topic."""
    for n in range(first, size.facts, step):
        yield raw.publish(
            f"s{n % size.sessions}", scope_text(n), f"fact {n} " + "x" * 80
        )


def _claims(size: Size) -> Any:
    for start in range(0, size.claims, 64):
        scopes = [scope_text(i) for i in range(start, min(size.claims, start + 64))]
        yield raw.claim(f"s{(start // 64) % size.sessions}", scopes)


def _broker(folder: Path, size: Size) -> Broker:
    return Broker(folder, extra_args=["--facts-max", str(max(size.facts * 2, 1000))])


def run_join(ctx: Run) -> None:
    """A session joining a repo with 1,000 and with 10,000 claims (and facts)."""
    facts = ctx.scale(5_000, 100_000)
    for claims, label in ((1_000, "_1k"), (10_000, "")):
        size = Size(sessions=50, claims=claims, facts=facts)
        _join(ctx, size, label)


def _join(ctx: Run, size: Size, label: str) -> None:
    folder = ctx.folder(f"join{label}")
    name = f"join_snapshot_ms{label}"
    check_name = f"sdk_may_edit_p50_us{label or '_10k'}"
    joins: list[float] = []
    checks: list[float] = []
    with _broker(folder, size) as broker:
        built = build(broker, size, ctx.scale(10, 120))
        for _ in range(ctx.reps):
            try:
                took, check = asyncio.run(_join_once(broker, folder, size.claims))
            except Exception as exc:
                reason = f"the session could not join: {exc}{_why(broker)}"
                ctx.report.missing(name, reason)
                ctx.report.missing(check_name, reason)
                return
            joins.append(took)
            checks.append(check)
    report = ctx.report
    report.add(name, joins, "ms")
    report.note(
        name,
        f"AsyncSession.connect until its replica is loaded; broker holding "
        f"{_built(size, built)}; unpinned",
    )
    report.add(check_name, checks, "us")
    report.note(
        check_name,
        f"AsyncSession.may_edit (path mapping, lock, replica), {size.claims:,} claims",
    )


async def _join_once(broker: Broker, folder: Path, claims: int) -> tuple[float, float]:
    began = time.perf_counter()
    session = await open_session(
        broker.url, folder / "repo", "joiner", repo_id=REPO, timeout=5.0
    )
    took = (time.perf_counter() - began) * 1000
    try:
        clock = time.perf_counter_ns
        times = []
        for path in probe_paths(claims, 1000):
            start = clock()
            session.may_edit(path)
            times.append((clock() - start) / 1000)
    finally:
        await session.close()
    return took, quantile(times, 0.5)


def _wait_indexed(broker: Broker, limit_s: float = 60.0) -> None:
    """Wait until a restarted broker has built every repository's index."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        status = ask(broker.url, "status", 1.0)
        repos = (status or {}).get("repos", {})
        if status is not None and not any(r.get("indexing") for r in repos.values()):
            return
        time.sleep(0.01)
    raise TimeoutError("the restarted broker did not finish its index in time")


def run_memory(ctx: Run) -> None:
    """Broker RSS with a large state, and a restart with it."""
    size = (
        Size(sessions=100, claims=10_000, facts=10_000)
        if ctx.quick
        else Size(sessions=1_000, claims=100_000, facts=1_000_000)
    )
    folder = ctx.folder("mem")
    report = ctx.report
    restarts: list[float] = []
    indexed: list[float] = []
    with contextlib.ExitStack() as stack:
        broker = _broker(folder, size)
        stack.callback(broker.stop)
        broker.start()
        empty = rss_bytes(broker.pid)
        built = build(broker, size, ctx.scale(10, FACTS_LIMIT_S))
        rss = rss_bytes(broker.pid)
        for _ in range(ctx.reps):
            broker.stop()
            began = time.perf_counter()
            broker.start()
            restarts.append(broker.started_in_s)
            _wait_indexed(broker)
            indexed.append(time.perf_counter() - began)
        restored = rss_bytes(broker.pid)
    scale = "" if not ctx.quick else " (quick run: scaled down from 1,000 sessions, "
    scale += "100,000 claims, 1,000,000 facts)" if ctx.quick else ""
    report.add("broker_rss_mib", [rss / MIB], "MiB")
    report.note("broker_rss_mib", f"VmRSS after building {_built(size, built)}{scale}")
    report.add("broker_rss_empty_mib", [empty / MIB], "MiB")
    report.add("broker_rss_restored_mib", [restored / MIB], "MiB")
    report.note(
        "broker_rss_restored_mib",
        "VmRSS after the last restart, once the restored index is built",
    )
    report.add("restart_s", restarts, "s")
    report.add("restart_indexed_s", indexed, "s")
    report.note(
        "restart_indexed_s",
        "SIGTERM, then a new broker process until its status says no repository "
        "is still building its index",
    )
    report.note(
        "restart_s",
        f"SIGTERM, then a new broker process until it answers a ping, with "
        f"{_built(size, built)}{scale}",
    )
    for step in ("sessions_s", "claims_s", "facts_s"):
        report.add(f"build_{step}", [built[step]], "s")
    report.add("build_facts_per_s", [built["facts"] / built["facts_s"]], "/s")
    report.note(
        "build_facts_per_s",
        f"facts published per second while the state grows ({PUBLISHERS} clients, "
        f"window {raw.WINDOW} each)",
    )


def _why(broker: Broker) -> str:
    """The size of the snapshot reply, when it is over the message limit."""
    zctx = zmq.Context()
    sock = zctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(broker.url)
        sock.send(orjson.dumps({"op": "snapshot", "rid": "size", "repo": REPO}))
        if not sock.poll(5000):
            return ""
        size = len(sock.recv())
    finally:
        sock.close(linger=0)
        zctx.term()
    if size <= wire.MAX_MESSAGE_BYTES:
        return ""
    return (
        f" (the snapshot reply is {size:,} bytes and the client refuses messages"
        f" over {wire.MAX_MESSAGE_BYTES:,})"
    )


def _built(size: Size, built: dict[str, float]) -> str:
    """What was built, saying so when the facts fell short of the aim."""
    text = (
        f"{size.sessions:,} sessions, {size.claims:,} claims, "
        f"{built['facts']:,.0f} facts"
    )
    if built["facts"] < size.facts:
        text += f" (of {size.facts:,} aimed at, within the time bound)"
    if built["errors"]:
        text += (
            f", {built['errors']:.0f} requests refused (the broker's per-session "
            "rate limit) and not counted"
        )
    return text
