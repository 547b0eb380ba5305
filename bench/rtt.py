"""Round trips: a granted claim against raw echoes and peers' locks.

Each repetition runs every variant in turn under the same placement (server
side and client side pinned), so ratios are taken pair by pair. Under the
first placement the claim is also timed at a second broker that holds a
crowd: 1,000 more live sessions in the claimant's repository and 200 other
repositories with one each, which the broker's turn must not pay for.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Coroutine
from typing import Any

import zmq
import zmq.asyncio

from bench import raw
from bench.context import Run
from bench.harness import Broker, Placement, bench_child, pin_pid, pinned, placements
from bench.peers import PAYLOAD, nats_server, redis_server, why_missing
from bench.sessions import open_session
from bench.stats import quantile

Sampler = Callable[[int], Coroutine[Any, Any, list[float]]]

CROWD = 1_000
CROWD_REPO = "bench:crowd"
OTHER_REPOS = 200


def run(ctx: Run) -> None:
    """Measure every round trip under each placement."""
    folder = ctx.folder("rtt")
    rounds = ctx.scale(1500, 5000)
    chosen = placements() if not ctx.quick else placements()[:1]
    for place in chosen:
        with contextlib.ExitStack() as stack:
            echo = bench_child("echo", f"ipc://{folder}/echo.sock")
            stack.callback(echo.stop)
            echo.read()
            pin_pid(echo.pid, place.server)
            broker = stack.enter_context(Broker(folder, cpuset=place.server))
            crowd = None
            if place is chosen[0]:
                crowd = stack.enter_context(
                    Broker(ctx.folder("rtt-crowd"), cpuset=place.server)
                )
                _join_crowd(crowd.url)
            peers = _start_peers(ctx, stack, place)
            with pinned(place.client):
                per_rep = asyncio.run(
                    _measure(
                        ctx,
                        place,
                        f"ipc://{folder}/echo.sock",
                        (broker, crowd),
                        peers,
                        rounds,
                    )
                )
        _record(ctx, place, per_rep)


def _join_crowd(url: str) -> None:
    """The crowd's leased sessions, silent from then on (the bench broker's
    lease outlasts the run)."""
    hellos = [raw.hello(CROWD_REPO, f"crowd{n}") for n in range(CROWD)]
    hellos += [raw.hello(f"{CROWD_REPO}-{n}", f"other{n}") for n in range(OTHER_REPOS)]
    zctx = zmq.Context()
    client = raw.RawClient(zctx, url)
    try:
        client.pipeline(hellos)
        if client.errors:
            raise RuntimeError(f"{client.errors} of the crowd's joins failed")
    finally:
        client.close()
        zctx.term()


def _start_peers(
    ctx: Run, stack: contextlib.ExitStack, place: Placement
) -> dict[str, str]:
    found: dict[str, str] = {}
    for peer in ("redis", "nats"):
        reason = why_missing(peer)
        if reason is not None:
            for name in (f"{peer}_rtt_p50_us", f"{peer}_rtt_p99_us"):
                ctx.report.missing(name, reason)
            continue
        if peer == "redis":
            found[peer] = stack.enter_context(
                redis_server(ctx.folder("redis"), place.server)
            )
        else:
            url = stack.enter_context(nats_server(place.server))
            responder = bench_child("nats-responder", url, "echo")
            stack.callback(responder.stop)
            responder.read()
            pin_pid(responder.pid, place.server)
            found[peer] = url
    return found


async def _measure(
    ctx: Run,
    place: Placement,
    echo_url: str,
    brokers: tuple[Broker, Broker | None],
    peers: dict[str, str],
    rounds: int,
) -> dict[str, list[list[float]]]:
    """Every variant once per repetition; per variant, one sample list per rep."""
    broker, crowd = brokers
    async with contextlib.AsyncExitStack() as stack:
        samplers: dict[str, Sampler] = {
            "echo_sync": _echo_sync(stack, echo_url),
            "echo_async": await _echo_async(stack, echo_url),
            "claim": await _claim(stack, ctx, broker),
        }
        if crowd is not None:
            samplers["claim_crowd"] = await _claim(
                stack, ctx, crowd, "rtt-crowd-repo", CROWD_REPO
            )
        if "redis" in peers:
            samplers["redis"] = _redis_lock(stack, peers["redis"])
        if "nats" in peers:
            samplers["nats"] = await _nats_request(stack, peers["nats"])
        for sampler in samplers.values():
            await sampler(max(50, rounds // 10))
        results: dict[str, list[list[float]]] = {name: [] for name in samplers}
        for _ in range(ctx.reps):
            for name, sampler in samplers.items():
                results[name].append(await sampler(rounds))
        return results


def _echo_sync(stack: contextlib.AsyncExitStack, url: str) -> Sampler:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    stack.callback(ctx.term)
    stack.callback(sock.close, 0)

    async def sample(count: int) -> list[float]:
        out = []
        clock = time.perf_counter
        for _ in range(count):
            began = clock()
            sock.send(PAYLOAD)
            sock.recv()
            out.append(clock() - began)
        return out

    return sample


async def _echo_async(stack: contextlib.AsyncExitStack, url: str) -> Sampler:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    stack.callback(ctx.term)
    stack.callback(sock.close, 0)

    async def sample(count: int) -> list[float]:
        out = []
        clock = time.perf_counter
        for _ in range(count):
            began = clock()
            await sock.send(PAYLOAD)
            await sock.recv()
            out.append(clock() - began)
        return out

    return sample


async def _claim(
    stack: contextlib.AsyncExitStack,
    ctx: Run,
    broker: Broker,
    folder: str = "rtt-repo",
    repo_id: str | None = None,
) -> Sampler:
    session = await open_session(broker.url, ctx.folder(folder), "rtt", repo_id=repo_id)
    stack.push_async_callback(session.close)
    counter = iter(range(10**9))

    async def sample(count: int) -> list[float]:
        out = []
        clock = time.perf_counter
        for _ in range(count):
            path = f"src/rtt/file{next(counter)}.py"
            began = clock()
            grant = await session.claim(path)
            out.append(clock() - began)
            await session.release(grant=grant.id)
        return out

    return sample


def _redis_lock(stack: contextlib.AsyncExitStack, path: str) -> Sampler:
    import redis

    client = redis.Redis(unix_socket_path=path)
    stack.callback(client.close)
    unlock = client.register_script(
        "if redis.call('get', KEYS[1]) == ARGV[1] then "
        "return redis.call('del', KEYS[1]) else return 0 end"
    )
    counter = iter(range(10**9))

    async def sample(count: int) -> list[float]:
        out = []
        clock = time.perf_counter
        token = secrets.token_hex(8)
        for _ in range(count):
            key = f"lock:src/rtt/file{next(counter)}.py"
            began = clock()
            client.set(key, token, nx=True, px=30_000)
            out.append(clock() - began)
            unlock(keys=[key], args=[token])
        return out

    return sample


async def _nats_request(stack: contextlib.AsyncExitStack, url: str) -> Sampler:
    import nats

    nc = await nats.connect(url)
    stack.push_async_callback(nc.close)

    async def sample(count: int) -> list[float]:
        out = []
        clock = time.perf_counter
        for _ in range(count):
            began = clock()
            await nc.request("echo", PAYLOAD, timeout=2)
            out.append(clock() - began)
        return out

    return sample


_NAMES = {
    "echo_sync": "echo_rtt_sync",
    "echo_async": "echo_rtt_async",
    "claim": "claim_rtt",
    "claim_crowd": "claim_rtt_crowd",
    "redis": "redis_rtt",
    "nats": "nats_rtt",
}


def _record(ctx: Run, place: Placement, per_rep: dict[str, list[list[float]]]) -> None:
    """Figures in µs per placement; the split placement also gets plain names."""
    report = ctx.report
    suffix = "" if place.name == placements()[0].name else f"_{place.name}"
    stats: dict[str, dict[str, list[float]]] = {}
    for variant, reps in per_rep.items():
        stats[variant] = {
            q: [quantile(samples, level) * 1e6 for samples in reps]
            for q, level in (("p50", 0.5), ("p99", 0.99))
        }
        for q in ("p50", "p99"):
            name = f"{_NAMES[variant]}_{q}_us{suffix}"
            report.add(name, stats[variant][q], "us")
            report.note(
                name,
                f"placement {place.name}: server on CPUs {sorted(place.server or [])}"
                f", client on {sorted(place.client or [])}; "
                f"{len(reps[0])} round trips per repetition",
            )
    claim, echo = stats["claim"], stats["echo_async"]
    for q in ("p50", "p99"):
        report.ratio(f"claim_rtt_{q}_ratio{suffix}", claim[q], echo[q])
    if "claim_crowd" in stats:
        report.ratio("claim_rtt_crowd_ratio", stats["claim_crowd"]["p50"], claim["p50"])
        report.note(
            "claim_rtt_crowd_ratio",
            f"claim p50 at a broker holding {CROWD:,} more live sessions in the "
            f"claimant's repository and {OTHER_REPOS} other repositories with "
            "one each, over the claim p50 at one without",
        )
    for peer in ("redis", "nats"):
        if peer in stats:
            report.ratio(
                f"claim_rtt_p50_vs_{peer}{suffix}", claim["p50"], stats[peer]["p50"]
            )
