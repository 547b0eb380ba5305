"""The pieces of a fault run: a raw client, an event observer, worker processes.

Everything runs as real processes on ipc sockets in a private directory; the
test drives faults (signals, failpoints, a partition, clock jumps) and the
checkers judge the recorded histories, events and store afterwards.
"""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import zmq

from fleetbus import wire
from tests.faults import history
from tests.faults.worker import REPO
from tests.support.brokerproc import BrokerProcess

ROOT = Path(__file__).resolve().parents[2]
TEST_HOOKS = {"FLEETBUS_TEST_HOOKS": "1"}


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.02
) -> Any:
    """Poll ``predicate`` until it returns something true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(step)


class Raw:
    """A bare DEALER speaking the wire protocol, for checks and hostile input."""

    def __init__(self, url: str, ctx: zmq.Context[Any] | None = None) -> None:
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self._ids = itertools.count(1)

    def send_raw(self, *frames: bytes) -> None:
        """Send frames exactly as given."""
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next reply, or None if none came in time."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        reply: dict[str, Any] = orjson.loads(self.sock.recv())
        return reply

    def request(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Send one request and return its final reply (skipping queued notes)."""
        rid = fields.pop("rid", None) or f"raw-{next(self._ids)}"
        self.sock.send(orjson.dumps({"op": op, "rid": rid, **fields}))
        deadline = time.monotonic() + timeout
        while True:
            reply = self.recv(max(0.0, deadline - time.monotonic()))
            if reply is None:
                raise AssertionError(f"no reply to {op} within {timeout}s")
            if reply.get("rid") == rid and not reply.get("queued"):
                return reply

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(linger=0)


@dataclass
class Observed:
    """What the observer saw: events in arrival order, gaps and snapshots."""

    events: list[tuple[float, bytes, dict[str, Any]]] = field(default_factory=list)
    gaps: list[tuple[float, int, int]] = field(default_factory=list)
    snapshots: list[tuple[float, dict[str, Any]]] = field(default_factory=list)


class Observer(threading.Thread):
    """Subscribes to every stream of the fault repository and records it.

    On a claims-stream gap it takes a snapshot, as a replica would, so that
    the checkers can rebuild the table from what was seen.
    """

    def __init__(self, url: str, pub: str, repo: str = REPO) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.pub = pub
        self.repo = repo
        self.seen = Observed()
        self.applied = -1
        self.ready = threading.Event()
        self._halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        """Observe until stopped: snapshot first, then every event."""
        ctx = zmq.Context()
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(self.pub)
        sub.setsockopt(zmq.SUBSCRIBE, wire.claims_topic(self.repo))
        sub.setsockopt(zmq.SUBSCRIBE, wire.facts_subtree(self.repo, ()))
        raw = Raw(self.url, ctx)
        last = -1
        try:
            while not self._halt.is_set():
                if last < 0:
                    last = self._snapshot(raw)
                    self.applied = last
                    self.ready.set()
                    continue
                if not sub.poll(50):
                    continue
                topic, *bodies = sub.recv_multipart()
                for body in bodies:
                    event = orjson.loads(body)
                    now = time.monotonic()
                    if topic.startswith(b"c"):
                        last = self._claims_event(raw, now, topic, event, last)
                        self.applied = last
                    else:
                        with self.lock:
                            self.seen.events.append((now, topic, event))
        finally:
            raw.close()
            sub.close(linger=0)
            ctx.term()

    def _claims_event(
        self,
        raw: Raw,
        now: float,
        topic: bytes,
        event: dict[str, Any],
        last: int,
    ) -> int:
        if event.get("type") == "heartbeat":
            if event["head"] > last:
                with self.lock:
                    self.seen.gaps.append((now, last, event["head"]))
                return self._snapshot(raw)
            return last
        if event["seq"] <= last:
            return last
        with self.lock:
            self.seen.events.append((now, topic, event))
        if event["prev"] != last:
            with self.lock:
                self.seen.gaps.append((now, last, event["prev"]))
            return self._snapshot(raw)
        return int(event["seq"])

    def _snapshot(self, raw: Raw) -> int:
        while not self._halt.is_set():
            try:
                snap = raw.request("snapshot", timeout=0.5, repo=self.repo)
            except AssertionError:
                continue
            with self.lock:
                self.seen.snapshots.append((time.monotonic(), snap))
            return int(snap["head"])
        return -1

    def stop(self) -> None:
        """Stop observing and wait for the thread."""
        self._halt.set()
        self.join(10)


class Fleet:
    """A broker process, its observer and worker processes in one directory."""

    def __init__(
        self,
        workdir: Path,
        *,
        lease_ms: int = 1000,
        grace_ms: int | None = None,
        broker_args: list[str] | None = None,
    ) -> None:
        self.dir = workdir
        self.runs = workdir / "runs"
        self.runs.mkdir(parents=True, exist_ok=True)
        broker_dir = workdir / "broker"
        broker_dir.mkdir(exist_ok=True)
        self.broker = BrokerProcess(
            broker_dir,
            lease_ms=lease_ms,
            grace_ms=grace_ms,
            extra_args=broker_args,
            env=TEST_HOOKS,
        )
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.observer: Observer | None = None
        self.raw: Raw | None = None
        self.restarts: list[tuple[float, float]] = []

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> Fleet:
        """Start the broker and the observer."""
        self.broker.start()
        self.raw = Raw(self.broker.url)
        status = self.raw.request("status")
        self.observer = Observer(self.broker.url, status["pub"])
        self.observer.start()
        assert self.observer.ready.wait(10), "observer did not start"
        return self

    def close(self) -> None:
        """Stop everything that was started, reaping every process."""
        (self.runs / "exit").touch()
        for proc in self.workers.values():
            if proc.poll() is None:
                with _suppress():
                    proc.send_signal(signal.SIGCONT)
        for proc in self.workers.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.observer is not None:
            self.observer.stop()
        if self.raw is not None:
            self.raw.close()
        self.broker.kill()

    def spawn(
        self, sid: str, seed: int, *args: str, url: str | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a worker process for session ``sid``."""
        env = {**os.environ, "FLEETBUS_URL": url or self.broker.url}
        env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
        log = open(self.runs / f"{sid}.log", "ab")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.faults.worker",
                    str(self.runs),
                    sid,
                    str(seed),
                    *args,
                ],
                stdout=log,
                stderr=log,
                env=env,
                cwd=ROOT,
            )
        self.workers[sid] = proc
        return proc

    def kill_broker(self) -> float:
        """SIGKILL the broker; returns when it died."""
        self.broker.kill()
        return time.monotonic()

    def restart_broker(self, env: dict[str, str] | None = None) -> None:
        """Start the broker again on the same socket and store."""
        down = time.monotonic()
        self.broker.start(env)
        self.restarts.append((down, time.monotonic()))

    def arm(self, point: str) -> None:
        """Make the broker SIGKILL itself at ``point`` of its next commit.

        That commit can come before the reply to this request has left the
        broker's socket: a broker that died without answering was armed.
        """
        assert self.raw is not None
        try:
            reply = self.raw.request("test.failpoint", point=point)
        except AssertionError:
            if self.broker.proc is None or self.broker.proc.poll() is None:
                raise
            return
        assert reply["ok"], reply

    def shift_clock(
        self, *, wall_ms: int = 0, back: bool = False, mono_ms: int = 0
    ) -> None:
        """Move the broker's clocks through its test hook."""
        assert self.raw is not None
        reply = self.raw.request(
            "test.clock", wall_ms=wall_ms, back=back, monotonic_ms=mono_ms
        )
        assert reply["ok"], reply

    # -- reading the outcome -----------------------------------------------------

    def wait_done(self, sids: list[str] | None = None, timeout: float = 60.0) -> None:
        """Wait until the workers finished their operations."""
        for sid in sids or list(self.workers):
            wait_for(
                lambda s=sid: (
                    (self.runs / f"{s}.done").exists()
                    or self.workers[s].poll() is not None
                ),
                timeout,
                f"worker {sid} to finish",
            )

    def snapshot(self) -> dict[str, Any]:
        """The broker's claim table of the fault repository."""
        assert self.raw is not None
        reply = self.raw.request("snapshot", repo=REPO)
        assert reply["ok"], reply
        return reply

    def history(self) -> list[history.Op]:
        """Every worker's recorded operations."""
        return history.load(sorted(self.runs.glob("*.jsonl")))

    def replicas(self) -> dict[str, dict[str, Any]]:
        """The last replica dump of each worker that wrote one."""
        out = {}
        for path in self.runs.glob("*.replica.json"):
            try:
                out[path.name.split(".")[0]] = orjson.loads(path.read_bytes())
            except orjson.JSONDecodeError:
                continue
        return out

    def store_rows(self) -> dict[str, Any]:
        """Claims and facts as the broker's SQLite file holds them (read-only)."""
        uri = f"file:{self.broker.data_dir / 'fleetbus.db'}?mode=ro"
        db = sqlite3.connect(uri, uri=True)
        try:
            claims = {
                cid: orjson.loads(body)
                for cid, body in db.execute(
                    "SELECT id, body FROM claims WHERE repo = ?", (REPO,)
                )
            }
            facts = _fact_rows(db)
        finally:
            db.close()
        return {"claims": claims, "facts": facts}


def _fact_rows(db: sqlite3.Connection) -> dict[str, dict[str, Any]]:
    rows = db.execute("SELECT id, body FROM facts WHERE repo = ?", (REPO,))
    return {fact_id: orjson.loads(body) for fact_id, body in rows}


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], ProcessLookupError)  # type: ignore[arg-type]
