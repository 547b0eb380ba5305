"""The watcher behind ``fleetbus tail``, driven in-process against a real broker."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fleetbus.client import connect
from fleetbus.ops.link import Link
from fleetbus.ops.watch import Watcher
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
