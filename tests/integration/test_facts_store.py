"""Facts kept in the store, not in memory: what a broker restart must keep."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from fleetbus import wire
from tests.support.brokerproc import BrokerProcess

REPO = "git:r"
WAIT_MS = 10_000


class Wire:
    """One DEALER speaking the protocol to a broker, one request at a time."""

    def __init__(self, ctx: zmq.Context[Any], url: str) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)

    def raw(self, op: str, rid: str, **fields: Any) -> bytes:
        self.sock.send(orjson.dumps({"op": op, "rid": rid, **fields}))
        assert self.sock.poll(WAIT_MS), f"no reply to {op}"
        return self.sock.recv()

    def ask(self, op: str, rid: str, **fields: Any) -> dict[str, Any]:
        reply = orjson.loads(self.raw(op, rid, **fields))
        assert reply["ok"], reply
        return dict(reply)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[Any]]:
    context: zmq.Context[Any] = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
def client(broker: BrokerProcess, ctx: zmq.Context[Any]) -> Callable[[], Wire]:
    def connect() -> Wire:
        return Wire(ctx, broker.url)

    return connect


def _hello(client: Wire, sid: str = "s1") -> None:
    client.ask("hello", f"hello-{sid}", repo=REPO, sid=sid, name=sid, meta={})


def test_a_publish_retried_after_a_restart_gets_its_first_reply(
    broker: BrokerProcess, client: Callable[[], Wire]
) -> None:
    """Publish replies are remembered in the store only; a retry of one after
    SIGKILL and restart is answered with it and publishes nothing."""
    first = client()
    _hello(first)
    reply = first.raw("publish", "p1", sid="s1", topics=["src/a.py"], body="one")

    broker.restart()
    again = client()
    retried = again.raw("publish", "p1", sid="s1", topics=["src/a.py"], body="two")
    facts = again.ask("facts", "q1", repo=REPO, include_history=True)["facts"]

    assert retried == reply
    assert [fact["body"] for fact in facts] == ["one"]


def test_facts_stream_links_continue_across_a_restart(
    broker: BrokerProcess, client: Callable[[], Wire], ctx: zmq.Context[Any]
) -> None:
    """Stream heads are read from the store, not loaded: the first event on a
    topic after a restart links to the last one before it."""
    first = client()
    _hello(first)
    before = first.ask("publish", "p0", sid="s1", topics=["src/a.py"], body="x")

    broker.restart()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(broker.url + ".pub")
    sub.setsockopt(zmq.SUBSCRIBE, wire.facts_topic(REPO, ("src", "a.py")))
    again = client()
    seqs = [before["seq"]]
    received: list[dict[str, Any]] = []
    while not received:
        n = len(seqs)
        reply = again.ask("publish", f"p{n}", sid="s1", topics=["src/a.py"], body="y")
        seqs.append(reply["seq"])
        if sub.poll(100):
            received = [orjson.loads(frame) for frame in sub.recv_multipart()[1:]]

    event = received[0]
    assert event["prev"] == seqs[seqs.index(event["seq"]) - 1]
    assert event["prev"] >= before["seq"]


def test_a_store_of_the_release_before_opens_with_its_facts(
    short_tmp: Path, ctx: zmq.Context[Any]
) -> None:
    """A schema-2 store written by the release before is migrated on start."""
    workdir = short_tmp / "old"
    (workdir / "data").mkdir(parents=True)
    fixture = Path(__file__).parent.parent / "data" / "store-schema2.sqlite"
    shutil.copy(fixture, workdir / "data" / "fleetbus.db")
    # Its facts are from 1970: kept from retention by age for the test.
    broker = BrokerProcess(workdir, extra_args=["--facts-max-age-s", "4000000000"])
    try:
        client = Wire(ctx, broker.start().url)
        history = client.ask("facts", "q1", repo=REPO, include_history=True)
        live = client.ask("facts", "q2", repo=REPO, scopes=["src/auth/"])
        found = client.ask("facts", "q3", repo=REPO, search="node")
    finally:
        broker.kill()

    assert [fact["id"] for fact in history["facts"]] == ["f1", "f2", "f3", "f4", "f6"]
    assert [fact["id"] for fact in live["facts"]] == ["f2", "f6"]
    assert [fact["id"] for fact in found["facts"]] == ["f2"]
