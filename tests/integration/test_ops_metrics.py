"""The broker's Prometheus endpoint: served, well-formed, counting."""

from __future__ import annotations

import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from fleetbus.client import connect
from fleetbus.errors import Conflict
from tests.support.brokerproc import BrokerProcess

DEADLINE_S = 10.0


def metrics_port(broker: BrokerProcess) -> int:
    """The port the broker logged for its metrics endpoint."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for line in broker.log().splitlines():
            if '"metrics.listening"' in line:
                return int(orjson.loads(line)["port"])
        time.sleep(0.02)
    raise AssertionError(f"no metrics.listening in the log:\n{broker.log()}")


def scrape(port: int) -> dict[str, float]:
    """Every sample of one scrape, keyed by name and labels as written."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#") or not line:
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = float(value)
    return samples


@pytest.fixture
def metered(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    return broker_factory(extra_args=["--metrics", "127.0.0.1:0"])


def test_scrape_counts_a_claim(metered: BrokerProcess, short_tmp: Path) -> None:
    """A grant moves the grant counter, the held gauge and the op's histogram."""
    port = metrics_port(metered)
    before = scrape(port)

    with connect(metered.url, repo=short_tmp, name="alice") as alice:
        alice.claim("src/a.py", intent="fix")
        during = scrape(port)

    assert before["fleetbus_claim_grants_total"] == 0
    assert during["fleetbus_claim_grants_total"] == 1
    assert during["fleetbus_claims_held"] == 1
    assert during["fleetbus_sessions"] == 1
    assert during['fleetbus_requests_total{op="claim"}'] == 1
    assert during['fleetbus_request_duration_seconds_count{op="claim"}'] == 1
    assert during['fleetbus_request_duration_seconds_bucket{op="claim",le="+Inf"}'] == 1
    assert during['fleetbus_events_total{type="claim.granted"}'] == 1
    assert during["fleetbus_store_commit_duration_seconds_count"] >= 1
    assert during["fleetbus_snapshots_total"] >= 1


def test_refusals_and_releases_are_counted(
    metered: BrokerProcess, short_tmp: Path
) -> None:
    """A conflict counts as a refusal; a leave counts its released rows."""
    port = metrics_port(metered)

    with connect(metered.url, repo=short_tmp, name="a") as a:
        a.claim("src/")
        with (
            connect(metered.url, repo=short_tmp, name="b") as b,
            pytest.raises(Conflict),
        ):
            b.claim("src/x.py")
    after = scrape(port)

    assert after['fleetbus_claim_refusals_total{code="conflict"}'] == 1
    assert after['fleetbus_request_errors_total{code="conflict"}'] == 1
    assert after['fleetbus_claim_releases_total{reason="session_left"}'] == 1
    assert after["fleetbus_claims_held"] == 0


def test_waiting_claims_and_expiries_are_counted(
    metered: BrokerProcess, short_tmp: Path
) -> None:
    """A queued request shows in the waiting gauge; a TTL ending is an expiry."""
    port = metrics_port(metered)

    with (
        connect(metered.url, repo=short_tmp, name="a") as a,
        connect(metered.url, repo=short_tmp, name="b") as b,
    ):
        a.claim("src/", ttl=2)
        queued = threading.Event()
        b.on_event(lambda e: queued.set() if e["type"] == "wait.queued" else None)
        waiter = threading.Thread(
            target=b.claim, args=("src/x.py",), kwargs={"wait": 10}, daemon=True
        )
        waiter.start()
        assert queued.wait(DEADLINE_S)
        waiting = scrape(port)
        waiter.join(DEADLINE_S)
        after = scrape(port)

    assert waiting["fleetbus_claims_waiting"] == 1
    assert after["fleetbus_claims_waiting"] == 0
    assert after["fleetbus_claim_expiries_total"] == 1
    assert after['fleetbus_claim_releases_total{reason="ttl_expired"}'] == 1
    assert after["fleetbus_claim_grants_total"] == 2


def test_histogram_buckets_are_cumulative(metered: BrokerProcess) -> None:
    """Bucket counts never decrease with ``le`` and end at the count."""
    port = metrics_port(metered)
    with connect(metered.url, name="x"):
        pass

    samples = scrape(port)
    buckets = [
        (key, value)
        for key, value in samples.items()
        if key.startswith('fleetbus_request_duration_seconds_bucket{op="hello"')
    ]

    values = [value for _, value in buckets]
    assert values == sorted(values)
    assert values[-1] == samples['fleetbus_request_duration_seconds_count{op="hello"}']
    assert re.search(r'le="\+Inf"', buckets[-1][0])


def test_other_paths_are_not_found(metered: BrokerProcess) -> None:
    """Only ``/metrics`` (and ``/``) are served."""
    port = metrics_port(metered)

    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=5)

    assert caught.value.code == 404


def test_facts_published_and_delivered_are_counted(
    metered: BrokerProcess, short_tmp: Path
) -> None:
    """A published fact counts once, however many topics; a query delivers it."""
    port = metrics_port(metered)

    with connect(metered.url, repo=short_tmp, name="alice") as alice:
        alice.publish("src/a.py", "docs/", text="flaky test in CI")
        alice.facts()
    after = scrape(port)

    assert after["fleetbus_facts_published_total"] == 1
    assert after["fleetbus_facts_delivered_total"] >= 1
    assert after['fleetbus_events_published_total{stream="facts"}'] >= 2
