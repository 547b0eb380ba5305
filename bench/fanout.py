"""One fact fanned out to 100 subscribed sessions, against ``zmq.proxy``.

Both variants publish the same bytes (a real fact event) to the same 100 SUB
sockets in the same subscriber processes; only the relay differs: the broker
(which also decodes, stores and commits each fact) or a ``zmq.proxy``.
Nothing is pinned: relay, publisher and subscribers share both vCPUs.
"""

from __future__ import annotations

import contextlib
from typing import Any

import zmq

from bench import raw
from bench.burst import deliveries_per_s, start_subscribers
from bench.context import Run
from bench.harness import Broker, bench_child
from fleetbus import wire

REPO = "bench:fanout"
TOPIC = "src/fanout/notes.md"
SUBSCRIBERS = 100
PROCESSES = 2
BODY_PAD = "x" * 120


def run(ctx: Run) -> None:
    """Deliveries per second through the broker and through ``zmq.proxy``."""
    folder = ctx.folder("fan")
    facts = ctx.scale(2_000, 10_000)
    limit_s = ctx.scale(30, 120)
    fleet: list[float] = []
    proxy: list[float] = []
    with contextlib.ExitStack() as stack:
        zctx = zmq.Context()
        stack.callback(zctx.term)
        broker = stack.enter_context(Broker(folder))
        client = raw.RawClient(zctx, broker.url)
        stack.callback(client.close)
        client.request("hello", **_args(raw.hello(REPO, "publisher")))
        sample = _sample_event(zctx, broker.url, client)
        relay = bench_child("proxy", f"ipc://{folder}/px-in", f"ipc://{folder}/px-out")
        stack.callback(relay.stop)
        relay.read()
        pub = zctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 0)
        pub.connect(f"ipc://{folder}/px-in")
        stack.callback(pub.close, 0)
        for _ in range(ctx.reps):
            proxy.append(
                _proxy_burst(pub, f"ipc://{folder}/px-out", sample, facts, limit_s)
            )
            fleet.append(_fleet_burst(client, broker, facts, limit_s))
    report = ctx.report
    report.add("fanout_100_deliveries_per_s", fleet, "/s")
    report.add("proxy_fanout_100_deliveries_per_s", proxy, "/s")
    report.ratio("fanout_ratio", fleet, proxy)
    how = (
        f"{facts:,} facts of one publisher to {SUBSCRIBERS} SUB sockets in "
        f"{PROCESSES} processes; unpinned; raw protocol publisher (window "
        f"{raw.WINDOW})"
    )
    for name in ("fanout_100_deliveries_per_s", "proxy_fanout_100_deliveries_per_s"):
        report.note(name, how)


def _args(message: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "op"}


def _sample_event(
    zctx: zmq.Context[Any], url: str, client: raw.RawClient
) -> list[bytes]:
    """The frames of one real fact event, to replay through the proxy."""
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    status = client.request("status")
    sub.connect(status.get("pub") or url + ".pub")
    sub.setsockopt(zmq.SUBSCRIBE, wire.facts_subtree(REPO, ()))
    try:
        for _ in range(200):
            client.request("publish", **_args(raw.publish("publisher", TOPIC, "s")))
            if sub.poll(50):
                frames: list[bytes] = sub.recv_multipart()
                return frames
    finally:
        sub.close(linger=0)
    raise RuntimeError("no fact event came back from the broker")


def _with_mark(frames: list[bytes], mark: str) -> list[bytes]:
    body = frames[-1].replace(b'"body":"s', f'"body":"{mark}{BODY_PAD}'.encode(), 1)
    return [frames[0], body]


def _proxy_burst(
    pub: zmq.Socket[Any], url: str, sample: list[bytes], facts: int, limit_s: float
) -> float:
    subs = start_subscribers(url, b"", SUBSCRIBERS, PROCESSES, limit_s)
    warmup, data, end = (_with_mark(sample, m) for m in "wde")

    def send_warmup() -> None:
        pub.send_multipart(warmup)

    def send() -> None:
        for _ in range(facts):
            pub.send_multipart(data)
        for _ in range(3):
            pub.send_multipart(end)

    return deliveries_per_s(subs, send_warmup, send, limit_s)


def _fleet_burst(
    client: raw.RawClient, broker: Broker, facts: int, limit_s: float
) -> float:
    subs = start_subscribers(
        broker.url + ".pub",
        wire.facts_subtree(REPO, ()),
        SUBSCRIBERS,
        PROCESSES,
        limit_s,
    )
    body = "d" + BODY_PAD

    def send_warmup() -> None:
        client.pipeline([raw.publish("publisher", TOPIC, "w")], window=1)

    def send() -> None:
        client.pipeline(raw.publish("publisher", TOPIC, body) for _ in range(facts))
        client.pipeline([raw.publish("publisher", TOPIC, "e") for _ in range(3)])

    return deliveries_per_s(subs, send_warmup, send, limit_s)
