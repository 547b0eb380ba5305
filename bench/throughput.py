"""Throughput: claim + release pairs, facts, and the peers' pub/sub.

Each runs unpinned (the broker, the clients and the subscriber share both
vCPUs), so its figure is the whole machine's, with the spread over
repetitions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import zmq

from bench import raw
from bench.burst import collect, start_subscribers, warm
from bench.context import Run
from bench.harness import Broker, bench_child
from bench.peers import PAYLOAD, nats_server, redis_server, why_missing
from fleetbus import wire

PAIR_SESSIONS = 20
PAIR_PROCESSES = 2
#: Session counts of the throughput-against-sessions sweep (quick: the first two).
SWEEP = (1, 5, 50)
#: The children of a load start together this long (plus 50 ms a session) after
#: they are launched, all of them ready by then.
START_S = 0.5
PUBLISHERS = 10
FACTS_REPO = "bench:facts"


def run_pairs(ctx: Run) -> None:
    """Claim + release pairs per second: 20 SDK sessions on disjoint files.

    Each repetition also runs the same load with fewer and more sessions
    (:data:`SWEEP`, in shorter windows), for throughput against sessions.
    """
    folder = ctx.folder("pairs")
    seconds = ctx.scale(1.5, 5)
    sweep_s = ctx.scale(1, 3)
    sweep = SWEEP[:2] if ctx.quick else SWEEP
    rates: list[float] = []
    echoed: list[float] = []
    swept: dict[int, list[float]] = {n: [] for n in sweep}
    echo_url = f"ipc://{folder}/echo.sock"
    with Broker(folder) as broker:
        echo = bench_child("echo", echo_url)
        try:
            echo.read()
            for _ in range(ctx.reps):
                rates.append(_pairs_once(broker, folder, seconds, PAIR_SESSIONS))
                echoed.append(_echo_pairs_once(echo_url, seconds, PAIR_SESSIONS))
                for sessions in sweep:
                    swept[sessions].append(
                        _pairs_once(broker, folder, sweep_s, sessions)
                    )
        finally:
            echo.stop()
    ctx.report.add("claim_release_per_s", rates, "/s")
    ctx.report.add("echo_claim_release_per_s", echoed, "/s")
    ctx.report.ratio("claim_release_echo_ratio", rates, echoed)
    ctx.report.note(
        "echo_claim_release_per_s",
        f"the same {PAIR_SESSIONS} tasks in {PAIR_PROCESSES} processes through the "
        "SDK's transport, against an echo ROUTER instead of the broker: the most "
        "any broker could give this client shape here",
    )
    ctx.report.note(
        "claim_release_per_s",
        f"{PAIR_SESSIONS} AsyncSessions (replica on) in {PAIR_PROCESSES} processes, "
        f"each claiming and releasing its own files for {seconds} s; unpinned",
    )
    for sessions, values in swept.items():
        name = f"claim_release_per_s_sessions_{sessions}"
        ctx.report.add(name, values, "/s")
        ctx.report.note(
            name,
            f"as claim_release_per_s with {sessions} sessions in "
            f"{min(sessions, PAIR_PROCESSES)} processes, for {sweep_s} s",
        )


def _pairs_once(broker: Broker, folder: Any, seconds: float, sessions: int) -> float:
    return _load(["claimers", broker.url, str(folder / "repo")], seconds, sessions)


def _echo_pairs_once(url: str, seconds: float, sessions: int) -> float:
    return _load(["echo-claimers", url], seconds, sessions)


def _load(command: list[str], seconds: float, sessions: int) -> float:
    """Pairs per second of ``sessions`` split over the children ``command`` runs."""
    processes = min(sessions, PAIR_PROCESSES)
    shares = [
        sessions // processes + (n < sessions % processes) for n in range(processes)
    ]
    firsts = [sum(shares[:n]) for n in range(processes)]
    start_at = time.monotonic() + START_S + 0.05 * sessions
    children = [
        bench_child(*command, str(first), str(share), f"{start_at}:{seconds}")
        for first, share in zip(firsts, shares, strict=True)
    ]
    try:
        for child in children:
            child.read()
        if time.monotonic() > start_at:
            raise RuntimeError("the load's processes were not ready by its start")
        reports = [child.read(timeout=seconds + 60) for child in children]
    finally:
        for child in children:
            child.stop()
    return sum(r["pairs"] for r in reports) / max(r["window"] for r in reports)


def run_facts(ctx: Run) -> None:
    """Facts acknowledged and delivered to one subscriber, from 10 publishers.

    The publishers speak the wire protocol with a window of requests in
    flight each; the figure is deliveries per second at the subscriber.
    """
    folder = ctx.folder("facts")
    per_publisher = ctx.scale(2_000, 10_000)
    limit_s = ctx.scale(60, 180)
    delivered, acked, relayed = [], [], []
    topic = wire.facts_subtree(FACTS_REPO, ())
    with contextlib.ExitStack() as stack:
        zctx = zmq.Context()
        stack.callback(zctx.term)
        broker = stack.enter_context(
            Broker(folder, extra_args=["--facts-max", "10000000"])
        )
        relay_url = f"ipc://{folder}/relay.sock"
        relay = bench_child("relay", relay_url, relay_url + ".pub", topic.hex())
        stack.callback(relay.stop)
        relay.read()
        clients, relay_clients = [], []
        for n in range(PUBLISHERS):
            client = raw.RawClient(zctx, broker.url)
            stack.callback(client.close)
            client.request("hello", **_args(raw.hello(FACTS_REPO, f"p{n}")))
            clients.append(client)
            relay_clients.append(raw.RawClient(zctx, relay_url))
            stack.callback(relay_clients[-1].close)
        for _ in range(ctx.reps):
            rate, ack_rate = _facts_once(
                broker.url + ".pub", clients, per_publisher, limit_s
            )
            delivered.append(rate)
            acked.append(ack_rate)
            relayed.append(
                _facts_once(relay_url + ".pub", relay_clients, per_publisher, limit_s)[
                    0
                ]
            )
    ctx.report.add("facts_per_s", delivered, "/s")
    ctx.report.add("facts_acked_per_s", acked, "/s")
    ctx.report.add("relay_facts_per_s", relayed, "/s")
    ctx.report.ratio("facts_relay_ratio", delivered, relayed)
    ctx.report.note(
        "relay_facts_per_s",
        "the same publishers and subscriber through a relay that acknowledges and "
        "publishes each request without decoding, checking or storing it",
    )
    ctx.report.note(
        "facts_per_s",
        f"{PUBLISHERS} publishers x {per_publisher:,} facts (raw protocol, window "
        f"{raw.WINDOW} each, one process), one SUB subscriber; unpinned",
    )
    _peer_pubsub(ctx, per_publisher * PUBLISHERS, limit_s)


def _args(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "op"}


def _facts_once(
    pub_url: str, clients: list[raw.RawClient], count: int, limit_s: float
) -> tuple[float, float]:
    """Deliveries and acknowledgements per second of one burst from ``clients``."""
    subs = start_subscribers(pub_url, wire.facts_subtree(FACTS_REPO, ()), 1, 1, limit_s)
    body = "d" + "x" * 120
    try:
        warm(
            subs,
            lambda: clients[0].pipeline(
                [raw.publish("p0", "src/facts/w.md", "w")], window=1
            ),
        )
        began = time.monotonic()
        work = [
            (client, _publishes(f"p{n}", body, count))
            for n, client in enumerate(clients)
        ]
        replies = raw.pump(work, timeout_s=limit_s)
        took = time.monotonic() - began
        clients[0].pipeline([raw.publish("p0", "src/facts/w.md", "e")], window=1)
    except BaseException:
        for child in subs:
            child.stop()
        raise
    received, window = collect(subs, limit_s)
    return received / window, replies / took


def _publishes(sid: str, body: str, count: int) -> Iterator[dict[str, Any]]:
    for _ in range(count):
        yield raw.publish(sid, f"src/facts/{sid}.md", body)


def _peer_pubsub(ctx: Run, count: int, limit_s: float) -> None:
    """One publisher to one subscriber through Redis and NATS, same payload."""
    runners = {"redis": _redis_pubsub, "nats": _nats_pubsub}
    for peer, runner in runners.items():
        name = f"{peer}_pubsub_per_s"
        reason = why_missing(peer)
        if reason is not None:
            ctx.report.missing(name, reason)
            continue
        rates = runner(ctx, count, limit_s)
        ctx.report.add(name, rates, "/s")
        ctx.report.note(
            name, f"one publisher (pipelined) to one subscriber, {count:,} messages"
        )


def _redis_pubsub(ctx: Run, count: int, limit_s: float) -> list[float]:
    import redis

    rates = []
    with redis_server(ctx.folder("redis-ps"), None) as path:
        client = redis.Redis(unix_socket_path=path)
        try:
            for _ in range(ctx.reps):
                subs = [bench_child("redis-sub", path, "bench", str(limit_s))]

                def send(mark: bytes, n: int) -> None:
                    pipe = client.pipeline(transaction=False)
                    for i in range(n):
                        pipe.publish("bench", mark + PAYLOAD)
                        if i % 100 == 99:
                            pipe.execute()
                    pipe.execute()

                warm(subs, lambda: send(b"w", 1))
                send(b"d", count)
                send(b"e", 1)
                received, window = collect(subs, limit_s)
                rates.append(received / window)
        finally:
            client.close()
    return rates


def _nats_pubsub(ctx: Run, count: int, limit_s: float) -> list[float]:
    import asyncio

    import nats

    rates = []
    with nats_server(None) as url:
        for _ in range(ctx.reps):
            subs = [bench_child("nats-sub", url, "bench", str(limit_s))]

            async def send(mark: bytes, n: int) -> None:
                nc = await nats.connect(url)
                for _ in range(n):
                    await nc.publish("bench", mark + PAYLOAD)
                await nc.flush()
                await nc.close()

            warm(subs, lambda: asyncio.run(send(b"w", 1)))
            asyncio.run(send(b"d", count))
            asyncio.run(send(b"e", 1))
            received, window = collect(subs, limit_s)
            rates.append(received / window)
    return rates
