"""The watcher behind ``fleetbus tail``, driven in-process against a real broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from fleetbus.client import connect
from fleetbus.errors import BadInput
from fleetbus.ops.link import Link
from fleetbus.ops.watch import Since, Watcher, parse_since
from tests.support.brokerproc import BrokerProcess

DEADLINE_S = 15.0


def test_a_lost_fact_event_is_fetched_at_the_heartbeat(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """A fact event the watcher never receives is fetched once a broker
    heartbeat shows the repository moved on; what did arrive is not repeated."""
    with (
        connect(broker.url, repo=short_tmp, name="alice") as alice,
        Link(broker.url) as link,
    ):
        watcher = Watcher(link, alice.repo.id)
        watcher.start(None)
        receive = link.events
        lost = alice.publish("src/a.py", text="lost on the way")

        def lossy(timeout: float) -> list[tuple[bytes, dict[str, Any]]]:
            got = receive(timeout)
            return [(t, e) for t, e in got if e.get("fact", {}).get("id") != lost.id]

        link.events = lossy  # type: ignore[method-assign]
        kept = alice.publish("src/a.py", text="arrives")
        shown: list[str] = []
        deadline = time.monotonic() + DEADLINE_S
        while lost.id not in shown and time.monotonic() < deadline:
            for line in watcher.poll(0.2):
                shown += [line.event["fact"]["id"]] if "fact" in line.event else []

    assert sorted(shown) == sorted([lost.id, kept.id])


def test_since_takes_the_forms_of_facts_since() -> None:
    """``tail --since`` reads a seq, ages (also combined, and weeks) and ISO
    times as ``fleetbus facts --since`` does; anything else is bad input."""
    assert parse_since("42") == Since(seq=42)
    assert parse_since("1h30m", now=10_000.0) == Since(wall=4_600.0)
    assert parse_since("1w", now=1_000_000.0) == Since(wall=395_200.0)
    assert parse_since("1970-01-01T00:01:40Z") == Since(wall=100.0)
    with pytest.raises(BadInput, match="--since takes"):
        parse_since("yesterday")
