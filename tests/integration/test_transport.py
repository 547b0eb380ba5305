"""The ZeroMQ transport against plain sockets: nothing that arrives is missed."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import zmq

from fleetbus.client.transport import ZmqTransport
from fleetbus.wire import claims_topic

DEADLINE_S = 15.0


@pytest.fixture
def echo_url(short_tmp: Path) -> Iterator[str]:
    """A ROUTER on a thread answering every request at once with its rid."""
    url = f"ipc://{short_tmp}/echo.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(url)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if router.poll(50):
                ident, frame = router.recv_multipart()
                rid = orjson.loads(frame)["rid"]
                router.send_multipart([ident, orjson.dumps({"ok": True, "rid": rid})])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield url
    stop.set()
    thread.join()
    router.close(0)
    ctx.term()


async def test_every_reply_reaches_a_waiting_reader(echo_url: str) -> None:
    """Sends made while the reader waits, alone or in bursts, all get answers."""
    transport = ZmqTransport(echo_url)
    got: list[str] = []

    async def read(count: int) -> None:
        while len(got) < count:
            got.extend(str(reply["rid"]) for reply in await transport.replies())

    try:
        for n in range(300):
            reader = asyncio.create_task(read(n + 1))
            await asyncio.sleep(0)
            transport.send({"op": "ping", "rid": str(n)})
            await asyncio.wait_for(reader, DEADLINE_S)
        reader = asyncio.create_task(read(1300))
        for n in range(300, 1300):
            transport.send({"op": "ping", "rid": str(n)})
            if n % 7 == 0:
                await asyncio.sleep(0)
        await asyncio.wait_for(reader, DEADLINE_S)
    finally:
        transport.close()

    assert got == [str(n) for n in range(1300)]


async def test_events_reach_a_reader_across_subscriptions(short_tmp: Path) -> None:
    """Events published before and after a later subscription are all read."""
    url = f"ipc://{short_tmp}/pub.sock"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(url)
    transport = ZmqTransport(f"ipc://{short_tmp}/none.sock")
    first, second = claims_topic("one"), claims_topic("two")
    seen: list[tuple[bytes, int]] = []

    async def read() -> None:
        while True:
            for topic, event in await transport.events():
                seen.append((topic, int(event["n"])))

    async def until(done: int, topic: bytes) -> None:
        n = 0
        while sum(1 for t, _ in seen if t == topic) < done:
            pub.send_multipart([topic, orjson.dumps({"n": n})])
            n += 1
            await asyncio.sleep(0.01)

    reader = asyncio.create_task(read())
    try:
        transport.attach_events(url)
        transport.subscribe(first)
        await asyncio.wait_for(until(5, first), DEADLINE_S)
        transport.subscribe(second)
        await asyncio.wait_for(until(5, second), DEADLINE_S)
    finally:
        reader.cancel()
        transport.close()
        pub.close(0)
        ctx.term()

    assert {topic for topic, _ in seen} == {first, second}
