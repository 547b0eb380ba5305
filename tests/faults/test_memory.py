"""What the broker keeps in memory stays the size of what it means to keep."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from fleetbus import wire
from fleetbus.broker.config import BrokerConfig
from fleetbus.broker.server import Broker

REPLIES = 1000


def test_remembered_replies_keep_only_their_bytes(short_tmp: Path) -> None:
    """Regression: each remembered reply held orjson's whole 4 KiB output buffer.

    A broker taking a thousand mutating requests a second with the default
    retry window held gigabytes for replies of a few hundred bytes.
    """
    config = BrokerConfig(url=f"ipc://{short_tmp}/b.sock", data_dir=short_tmp / "d")
    broker = Broker(config)
    broker.start()
    try:
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for n in range(REPLIES):
                body = {"rid": f"r{n}", "ok": True, "grant": f"g:{n}", "fence": n}
                broker._remember(("s", f"r{n}"), wire.encode(body))
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert broker.store is not None
        broker.store.rollback()
    finally:
        broker.close()
    assert held < REPLIES * 1024, f"{held / REPLIES:.0f} bytes a reply"
