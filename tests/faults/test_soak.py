"""The soak test: hundreds of sessions on loopback TCP for minutes.

On demand only (``-m slow``). ``FLEETBUS_SOAK_S`` sets the duration (default
180 s), ``FLEETBUS_SOAK_PROCS`` and ``FLEETBUS_SOAK_SESSIONS`` the client
processes and the sessions in each (default 8 x 40). With
``FLEETBUS_SOAK_REPORT`` the figures are also written there as JSON.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.faults.harness import ROOT, Raw
from tests.faults.soak_client import REPO
from tests.security.conftest import free_port
from tests.support.brokerproc import BrokerProcess

FACTS_MAX = 5000
# Replies are kept this long for retries; memory is flat once the window is
# full, so the soak uses a window shorter than its own duration.
REQUEST_MEMORY_S = 30


def rss_kib(pid: int) -> int:
    """Resident memory of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Sampler(threading.Thread):
    """Samples a process's RSS every ``period`` seconds."""

    def __init__(self, pid: int, period: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, int]] = []
        self.halt = threading.Event()

    def run(self) -> None:
        """Sample until halted."""
        start = time.monotonic()
        while not self.halt.wait(self.period):
            self.samples.append((time.monotonic() - start, rss_kib(self.pid)))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p99 and max, in milliseconds."""
    ordered = sorted(values)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 2)

    return {"n": len(ordered), "p50": at(0.5), "p99": at(0.99), "max": at(1.0)}


def all_facts(raw: Raw) -> list[dict[str, Any]]:
    """Every retained fact of the soak repository, page by page."""
    out: list[dict[str, Any]] = []
    since = 0
    while True:
        reply = raw.request(
            "facts", repo=REPO, since=since, limit=10_000, include_history=True
        )
        assert reply["ok"], reply
        out.extend(reply["facts"])
        if not reply["more"]:
            return out
        since = reply["facts"][-1]["seq"]


def client_command(url: str, per: int, seconds: float, n: int, out: Path) -> list[str]:
    """The command line of soak client process ``n``."""
    module = "tests.faults.soak_client"
    return [sys.executable, "-m", module, url, str(per), str(seconds), str(n), str(out)]


SOAK_S = float(os.environ.get("FLEETBUS_SOAK_S", "180"))


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 300)
def test_soak(short_tmp: Path) -> None:
    """Nothing acknowledged is lost, memory stays flat, latencies are recorded."""
    seconds = SOAK_S
    procs = int(os.environ.get("FLEETBUS_SOAK_PROCS", "8"))
    per = int(os.environ.get("FLEETBUS_SOAK_SESSIONS", "40"))
    broker = BrokerProcess(
        short_tmp,
        lease_ms=5000,
        extra_args=[
            "--log-level",
            "warning",
            "--facts-max",
            str(FACTS_MAX),
            "--request-memory-s",
            str(REQUEST_MEMORY_S),
        ],
    )
    broker.url = f"tcp://127.0.0.1:{free_port()}"
    broker.start()
    assert broker.proc is not None
    sampler = Sampler(broker.proc.pid)
    sampler.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = [short_tmp / f"soak{n}.json" for n in range(procs)]
    clients = [
        subprocess.Popen(
            client_command(broker.url, per, seconds, n, out), cwd=ROOT, env=env
        )
        for n, out in enumerate(outs)
    ]
    try:
        for client in clients:
            assert client.wait(seconds + 120) == 0
    finally:
        for client in clients:
            if client.poll() is None:
                client.kill()
                client.wait()
        sampler.halt.set()
        sampler.join()
    raw = Raw(broker.url)
    try:
        results = [orjson.loads(out.read_bytes()) for out in outs]
        snapshot = raw.request("snapshot", repo=REPO)
        facts = all_facts(raw)
    finally:
        raw.close()
        broker.kill()

    counts: dict[str, int] = {}
    latency: dict[str, list[float]] = {}
    acked: list[str] = []
    for result in results:
        assert not result["failures"], result["failures"]
        for key, value in result["counts"].items():
            counts[key] = counts.get(key, 0) + value
        for op, values in result["latency"].items():
            latency.setdefault(op, []).extend(values)
        acked.extend(result["facts"])
    retained = {fact["id"]: fact for fact in facts}
    oldest = min(fact["seq"] for fact in facts) if facts else 0
    lost = [i for i in acked if int(i[1:]) >= oldest and i not in retained]
    rss = [kib for _t, kib in sampler.samples]
    third = max(1, len(rss) // 3)
    early, late = (
        statistics.median(rss[third : 2 * third] or rss),
        statistics.median(rss[-third:]),
    )
    figures = {
        "seconds": seconds,
        "sessions": procs * per,
        "counts": counts,
        "facts_acked": len(acked),
        "facts_retained": len(retained),
        "latency_ms": {op: percentiles(v) for op, v in latency.items()},
        "rss_kib": {"first": rss[0] if rss else 0, "middle": early, "last": late,
                    "max": max(rss, default=0)},
    }  # fmt: skip
    print(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    report = os.environ.get("FLEETBUS_SOAK_REPORT")
    if report:
        Path(report).write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    assert not lost, lost[:10]
    assert len(retained) <= FACTS_MAX
    assert snapshot["claims"] == []
    assert snapshot["sessions"] == []
    assert counts.get("granted", 0) == counts.get("released", 0)
    assert late <= early * 1.25 + 10_240, figures["rss_kib"]
