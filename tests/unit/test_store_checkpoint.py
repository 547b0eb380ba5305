"""The store's log is copied back between turns, never inside a commit."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest
import zmq

from fleetbus.broker import server
from fleetbus.broker.config import BrokerConfig
from fleetbus.broker.server import Broker
from fleetbus.broker.store import Store

PAGE = 4096


def _log_bytes(path: Path) -> int:
    return (path.parent / (path.name + "-wal")).stat().st_size


def test_commits_leave_the_log_alone_until_a_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    try:
        for n in range(1500):
            store.begin()
            store.db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"k{n}", "x" * 2000)
            )
            store.commit()
        # Left to itself SQLite copies the log back at 1,000 pages and reuses it.
        assert store.commits == 1500
        assert _log_bytes(path) > 1500 * PAGE

        assert store.checkpoint() == 0
        assert store.commits == 0
        store.close()
        reopened = Store(path)
        count = reopened.db.execute("SELECT count(*) FROM meta").fetchone()[0]
        reopened.close()
        assert count >= 1500
    finally:
        store.close()


def test_a_thread_copies_the_log_back_beside_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = Store(path)
    try:
        for n in range(200):
            store.begin()
            store.db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"k{n}", "x" * 2000)
            )
            store.commit()
        unchecked = path.stat().st_size
        store.checkpoint_in_background(0.01)
        deadline = time.monotonic() + 30
        while path.stat().st_size < unchecked + 50 * PAGE:
            assert time.monotonic() < deadline, "the log was never copied back"
            time.sleep(0.01)
        assert store.commits == 200, "the loop's own count is left alone"
    finally:
        store.close()
    reopened = Store(path)
    try:
        assert reopened.db.execute("SELECT count(*) FROM meta").fetchone()[0] >= 200
    finally:
        reopened.close()


def test_a_busy_broker_checkpoints_after_replying(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "CHECKPOINT_COMMITS", 5)
    config = BrokerConfig(url=f"ipc://{short_tmp}/b.sock", data_dir=short_tmp / "d")
    broker = Broker(config)
    broker.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(broker.url)
    store = broker.store
    assert store is not None

    def ask(n: int, op: str, **fields: object) -> dict[str, object]:
        sock.send(orjson.dumps({"op": op, "rid": f"r{n}", **fields}))
        assert broker.router.poll(10_000)
        broker.turn()
        assert sock.poll(10_000)
        reply: dict[str, object] = orjson.loads(sock.recv())
        assert reply["ok"] is True, reply
        return reply

    try:
        ask(0, "hello", repo="r", sid="s")
        checkpointed = False
        for n in range(1, server.CHECKPOINT_COMMITS + 2):
            before = store.commits
            ask(n, "claim", sid="s", scopes=[f"src/f{n}.py"])
            if store.commits < before:
                checkpointed = True
                break
        assert checkpointed, "no checkpoint after CHECKPOINT_COMMITS commits"
    finally:
        sock.close(linger=0)
        ctx.term()
        broker.close()
