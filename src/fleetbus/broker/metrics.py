"""The broker's Prometheus metrics: cheap counters and an HTTP endpoint.

The broker's loop counts with plain integer increments and fixed-bucket
histograms; nothing is formatted until a scrape asks. The endpoint is a
stdlib ``http.server`` on a daemon thread, answering ``GET /metrics`` in the
text exposition format (version 0.0.4). A scrape reads the counters while the
loop runs: a figure may be one event behind another, never torn.
"""

from __future__ import annotations

import bisect
import http.server
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds. The loop answers most requests within a commit, so the interesting
# range is tens of microseconds (a ping) to tens of milliseconds (a slow disk).
LATENCY_BUCKETS = (
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_EXPIRY_REASONS = frozenset({"session_lost", "ttl_expired"})
_STREAM_OF_KIND = {b"c": "claims", b"f": "facts", b"b": "broker"}

Gauge = tuple[str, str, float]
"""A value read at scrape time: name, help, value."""


class Histogram:
    """Counts of observations in fixed buckets, their sum and their number."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        """The exposition lines: cumulative buckets, then sum and count."""
        counts = list(self.counts)
        out: list[str] = []
        running = 0
        edges = [_number(bound) for bound in self.bounds] + ["+Inf"]
        for le, n in zip(edges, counts, strict=True):
            running += n
            out.append(f'{name}_bucket{{{labels}le="{le}"}} {running}')
        brace = f"{{{labels.rstrip(',')}}}" if labels else ""
        out.append(f"{name}_sum{brace} {_number(self.total)}")
        out.append(f"{name}_count{brace} {running}")
        return out


class Metrics:
    """Every figure the broker counts, with the hooks its loop calls."""

    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.releases: Counter[str] = Counter()
        self.published: Counter[str] = Counter()
        self.grants = 0
        self.claims_granted = 0
        self.expiries = 0
        self.snapshots = 0
        self.facts_published = 0
        self.facts_delivered = 0
        self.store_failures = 0
        self.latency: dict[str, Histogram] = {}
        self.commit_time = Histogram(LATENCY_BUCKETS)
        self.batch_size = Histogram(BATCH_BUCKETS)
        self._received: list[tuple[str, float]] = []
        self._last_fact_seq: Any = None

    # -- hooks of the loop ----------------------------------------------------

    def received(self, op: str) -> None:
        """A request for ``op`` came in; its latency runs until :meth:`replied`."""
        self.requests[op] += 1
        self._received.append((op, time.perf_counter()))

    def replied(self) -> None:
        """The turn's replies are sent: observe each request's latency."""
        if not self._received:
            return
        now = time.perf_counter()
        for op, started in self._received:
            histogram = self.latency.get(op)
            if histogram is None:
                histogram = self.latency[op] = Histogram(LATENCY_BUCKETS)
            histogram.observe(now - started)
        self._received.clear()

    def failed(self, code: str) -> None:
        """A request was answered with an error of ``code``."""
        self.errors[code] += 1

    def refused(self, code: str) -> None:
        """A claim was refused (conflict, deadlock, limit…)."""
        self.refusals[code] += 1

    def event(self, event: dict[str, Any]) -> None:
        """A change took place; count it by kind."""
        kind = event.get("type", "")
        self.events[kind] += 1
        if kind == "claim.granted":
            self.grants += 1
            self.claims_granted += len(event.get("claims", ()))
        elif kind == "claim.released":
            reason = str(event.get("reason", ""))
            rows = len(event.get("ids", ()))
            self.releases[reason] += rows
            if reason in _EXPIRY_REASONS:
                self.expiries += rows

    def sent(self, events: list[tuple[bytes, dict[str, Any]]]) -> None:
        """Events went out on the PUB socket."""
        for topic, event in events:
            stream = _STREAM_OF_KIND.get(topic[:1], "other")
            self.published[stream] += 1
            # A fact goes out once per topic prefix, as adjacent copies.
            if stream == "facts" and event.get("type") == "fact.published":
                seq = event.get("seq")
                if seq != self._last_fact_seq:
                    self.facts_published += 1
                    self._last_fact_seq = seq

    def committed(self, seconds: float) -> None:
        """A batch was committed in ``seconds``."""
        self.commit_time.observe(seconds)

    def batch(self, size: int) -> None:
        """A turn drained ``size`` requests."""
        self.batch_size.observe(size)

    # -- exposition -----------------------------------------------------------

    def render(self, gauges: Iterable[Gauge] = ()) -> str:
        """The text exposition of every metric, with ``gauges`` read now."""
        out: list[str] = []
        for name, help_text, value in gauges:
            _family(out, name, help_text, "gauge")
            out.append(f"{name} {_number(value)}")
        self._counters(out)
        _family(
            out,
            "fleetbus_request_duration_seconds",
            "Time from a request's arrival to its first reply.",
            "histogram",
        )
        for op in sorted(self.latency):
            out.extend(
                self.latency[op].lines(
                    "fleetbus_request_duration_seconds", f'op="{_label(op)}",'
                )
            )
        _family(
            out,
            "fleetbus_store_commit_duration_seconds",
            "Time to commit one batch to the store.",
            "histogram",
        )
        out.extend(self.commit_time.lines("fleetbus_store_commit_duration_seconds"))
        _family(
            out, "fleetbus_batch_size", "Requests drained per loop turn.", "histogram"
        )
        out.extend(self.batch_size.lines("fleetbus_batch_size"))
        return "\n".join(out) + "\n"

    def _counters(self, out: list[str]) -> None:
        labelled = (
            (
                "fleetbus_requests_total",
                "Requests received, by op.",
                "op",
                self.requests,
            ),
            (
                "fleetbus_request_errors_total",
                "Error replies, by code.",
                "code",
                self.errors,
            ),
            (
                "fleetbus_claim_refusals_total",
                "Claims refused, by code.",
                "code",
                self.refusals,
            ),
            (
                "fleetbus_events_total",
                "Changes made, by event type.",
                "type",
                self.events,
            ),
            (
                "fleetbus_claim_releases_total",
                "Claim rows released, by reason.",
                "reason",
                self.releases,
            ),
            (
                "fleetbus_events_published_total",
                "Events sent, by stream.",
                "stream",
                self.published,
            ),
        )
        for name, help_text, label, values in labelled:
            _family(out, name, help_text, "counter")
            for key in sorted(values):
                out.append(f'{name}{{{label}="{_label(key)}"}} {values[key]}')
        plain = (
            (
                "fleetbus_claim_grants_total",
                "Claims granted (one per grant).",
                self.grants,
            ),
            (
                "fleetbus_claim_rows_granted_total",
                "Claim rows granted.",
                self.claims_granted,
            ),
            (
                "fleetbus_claim_expiries_total",
                "Claim rows ended by a lost lease or a TTL.",
                self.expiries,
            ),
            (
                "fleetbus_snapshots_total",
                "Snapshots served (replica syncs and resyncs).",
                self.snapshots,
            ),
            (
                "fleetbus_facts_published_total",
                "Facts published.",
                self.facts_published,
            ),
            (
                "fleetbus_facts_delivered_total",
                "Facts carried in replies to queries.",
                self.facts_delivered,
            ),
            (
                "fleetbus_store_failures_total",
                "Batches rolled back on a store error.",
                self.store_failures,
            ),
        )
        for name, help_text, value in plain:
            _family(out, name, help_text, "counter")
            out.append(f"{name} {value}")


class MetricsServer:
    """``GET /metrics`` on ``host:port``, served from a daemon thread.

    ``collect`` is called on the server's thread for each scrape and returns
    the exposition text.
    """

    def __init__(self, host: str, port: int, collect: Callable[[], str]) -> None:
        handler = _handler(collect)
        server_class = _V6Server if ":" in host else http.server.ThreadingHTTPServer
        self._server = server_class((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="fleetbus-metrics", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The host and port actually bound (the port is chosen for port 0)."""
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _V6Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6


def _handler(
    collect: Callable[[], str],
) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                self.send_error(404, "try /metrics")
                return
            body = collect().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # Scrapes every few seconds would drown the broker's own log.
            return

    return Handler


def _family(out: list[str], name: str, help_text: str, kind: str) -> None:
    out.append(f"# HELP {name} {help_text}")
    out.append(f"# TYPE {name} {kind}")


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))
