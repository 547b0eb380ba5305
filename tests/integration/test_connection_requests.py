"""Requests on a shared connection: re-sent under their rid until answered."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import zmq

from fleetbus.client.connection import connection_for
from fleetbus.errors import BrokerUnavailable


class Stub:
    """A ROUTER on a thread that answers each rid's ``answer_at``-th copy."""

    def __init__(self, url: str, answer_at: int | None) -> None:
        self.seen: Counter[str] = Counter()
        self._answer_at = answer_at
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.bind(url)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            if not self._router.poll(20):
                continue
            ident, frame = self._router.recv_multipart()
            rid = orjson.loads(frame)["rid"]
            self.seen[rid] += 1
            if self.seen[rid] == self._answer_at:
                reply = orjson.dumps({"ok": True, "rid": rid})
                self._router.send_multipart([ident, reply])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._router.close(0)
        self._ctx.term()


@pytest.fixture
def stub_url(short_tmp: Path) -> str:
    return f"ipc://{short_tmp}/stub.sock"


@pytest.fixture
def second_copy(stub_url: str) -> Iterator[Stub]:
    stub = Stub(stub_url, answer_at=2)
    yield stub
    stub.stop()


@pytest.fixture
def silent(stub_url: str) -> Iterator[Stub]:
    stub = Stub(stub_url, answer_at=None)
    yield stub
    stub.stop()


async def test_an_unanswered_request_is_sent_again_under_its_rid(
    second_copy: Stub, stub_url: str
) -> None:
    """The first copy goes unanswered; the re-sent one gets the reply."""
    connection = connection_for(stub_url)
    owner = object()
    try:
        reply = await connection.exchange({"op": "ping", "rid": "r1"}, owner, 10.0)
    finally:
        connection.close()

    assert reply == {"ok": True, "rid": "r1"}
    assert second_copy.seen["r1"] == 2


async def test_a_request_never_answered_fails_at_its_deadline(
    silent: Stub, stub_url: str
) -> None:
    """No answer in time: BrokerUnavailable, after re-sending meanwhile."""
    connection = connection_for(stub_url)
    try:
        with pytest.raises(BrokerUnavailable):
            await connection.exchange({"op": "ping", "rid": "r1"}, object(), 0.5)
    finally:
        connection.close()

    assert silent.seen["r1"] >= 2
    assert connection.pending == {}


async def test_one_timer_wakes_for_each_retry_and_the_deadline_only(
    silent: Stub, stub_url: str
) -> None:
    """The timer is set for the earliest retry or deadline, not polled: a
    request never answered within 0.5 s wakes it at its retry (0.2 s) and at
    its deadline, and fails no earlier than that."""
    connection = connection_for(stub_url)
    ticks: list[float] = []
    tick = connection._tick

    def counted() -> None:
        ticks.append(connection.loop.time())
        tick()

    connection._tick = counted  # type: ignore[method-assign]
    began = connection.loop.time()
    try:
        with pytest.raises(BrokerUnavailable):
            await connection.exchange({"op": "ping", "rid": "r1"}, object(), 0.5)
    finally:
        connection.close()

    assert len(ticks) == 2, [t - began for t in ticks]
    assert ticks[0] - began >= 0.2 - 0.001
    assert ticks[1] - began >= 0.5 - 0.001
    assert silent.seen["r1"] == 2
