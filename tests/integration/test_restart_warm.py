"""A restarted broker builds its restored claim index by slices, serving between."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from fleetbus.broker import server
from fleetbus.broker.config import BrokerConfig
from fleetbus.broker.server import Broker
from fleetbus.errors import Conflict
from fleetbus.scope import parse_scope

REPO = "git:warm"
PATHS = 50


def _broker(short_tmp: Path) -> Broker:
    config = BrokerConfig(url=f"ipc://{short_tmp}/b.sock", data_dir=short_tmp / "d")
    broker = Broker(config)
    broker.start()
    return broker


def _claim(broker: Broker, sid: str, texts: list[str], rid: str) -> None:
    table = broker._table(REPO)
    outcome = table.claim(
        sid,
        [parse_scope(text) for text in texts],
        mode="exclusive",
        intent="",
        ttl_s=600.0,
        wait_s=None,
        rid=rid,
        now=broker._now(),
    )
    broker._absorb(REPO, outcome)


def _status(broker: Broker) -> dict[str, Any]:
    broker._on_status(b"peer", "st", {"op": "status", "rid": "st"})
    _ident, _rid, body = broker._outbox.pop()
    reply: dict[str, Any] = orjson.loads(body)
    return reply


def test_restored_index_is_built_a_slice_per_idle_moment(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _broker(short_tmp)
    try:
        table = first._table(REPO)
        first._absorb(
            REPO,
            table.join("s1", "one", {}, leased=True, lease_s=600.0, now=first._now()),
        )
        _claim(first, "s1", [f"src/m{n}/f.py" for n in range(PATHS)], "r1")
        first._flush()
    finally:
        first.close()
    monkeypatch.setattr(server, "WARM_SLICE", 10)

    broker = _broker(short_tmp)
    try:
        assert broker._warming == {REPO}
        assert _status(broker)["repos"][REPO]["indexing"] is True
        slices = 0
        while broker._warming:
            assert broker._poll_timeout(broker.clock.monotonic() + 1.0) == 0
            broker._idle()
            slices += 1
        assert slices == PATHS // 10
        assert broker._poll_timeout(broker.clock.monotonic() + 1.0) > 0
        assert _status(broker)["repos"][REPO]["indexing"] is False

        broker._table(REPO).join(
            "s2", "two", {}, leased=True, lease_s=600.0, now=broker._now()
        )
        with pytest.raises(Conflict):
            _claim(broker, "s2", ["src/m7/"], "r2")
    finally:
        broker.close()
