"""The broker's I/O loop: a thin shell around the claim tables and the store.

One thread, one loop. Each turn it waits for requests (or the next deadline),
drains every request that is ready, applies them to the in-memory tables,
writes what changed to SQLite in one transaction, commits, and only then sends
the replies and publishes the events. Batching the commit is what lets one
broker acknowledge tens of thousands of changes a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import zmq

from fleetbus import __version__, log, wire
from fleetbus.broker.config import BrokerConfig
from fleetbus.broker.facts import FactService
from fleetbus.broker.metrics import Gauge, Metrics, MetricsServer
from fleetbus.broker.store import Store, StoreError
from fleetbus.broker.wakeups import Wakeups
from fleetbus.claims import ClaimTable, Limits, Now, Outcome
from fleetbus.clock import Clock, OffsetClock
from fleetbus.config import split_hostport
from fleetbus.errors import (
    BadInput,
    BrokerUnavailable,
    FleetbusError,
    LimitExceeded,
    NotAuthorised,
    ProtocolError,
    UnknownSession,
)
from fleetbus.scope import Scope, parse_scope
from fleetbus.security import (
    LOCAL_CREDENTIAL,
    BrokerSecurity,
    CurveSettings,
    RateLimiter,
)
from fleetbus.sequence import CLAIMS_STREAM, Sequence

Handler = Callable[[bytes, str, dict[str, Any]], None]

MAX_NAME_LEN = 128
# The store's log is copied back by a thread every CHECKPOINT_INTERVAL_S, and
# by the loop itself when idle or after CHECKPOINT_COMMITS commits, which
# bounds the log (a commit writes a few pages) when the thread cannot catch up.
CHECKPOINT_INTERVAL_S = 1.0
CHECKPOINT_COMMITS = 1000
#: Literal paths put in a restored table's tree per idle moment (a few ms).
WARM_SLICE = 2_000
MAX_REPO_LEN = 512
FAILPOINTS_ENV = "FLEETBUS_FAILPOINTS"
TEST_HOOKS_ENV = "FLEETBUS_TEST_HOOKS"

# Log names of claims-stream events; released claims are "expired" when the
# broker, not the holder, ended them.
_EXPIRY_REASONS = {"session_lost", "ttl_expired"}


class Broker:
    """One broker process: sockets, tables, store.

    ``clock`` is injectable so that fault runs can move time; by default the
    system clocks behind run-time adjustable offsets.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        clock: Clock | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.config = config
        self.clock: Clock = clock or OffsetClock()
        self.limits = limits or Limits()
        self.log = log.get("broker")
        # Change lines are info (waits debug): below that level, skip building them.
        self._log_changes = log.enabled(config.log_level, "info")
        self.epoch = 0
        self.tables: dict[str, ClaimTable] = {}
        self.sequences: dict[str, Sequence] = {}
        self.session_repo: dict[str, str] = {}
        self.started = self.clock.wall()
        self._replies: OrderedDict[tuple[str, str], tuple[float, bytes]] = OrderedDict()
        self._waiting: dict[tuple[str, str], bytes] = {}
        self._outbox: list[tuple[bytes, str | None, bytes]] = []
        self._events: list[tuple[bytes, dict[str, Any]]] = []
        self._logs: list[tuple[str, str, dict[str, Any]]] = []
        self._dirty: set[str] = set()
        # Repositories whose restored claim index is still being built.
        self._warming: set[str] = set()
        # When each repository next has timed work, and those whose state
        # changed this turn, to be looked at again before the loop sleeps.
        self.wakeups = Wakeups()
        self._changed: set[str] = set()
        self._failpoints = _parse_failpoints(os.environ.get(FAILPOINTS_ENV, ""))
        self._stopping = False
        self.security = _security(config)
        self.rates = RateLimiter(config.rate_per_s, config.rate_burst)
        self._credential = LOCAL_CREDENTIAL
        self._handlers: dict[str, Handler] = {
            "ping": self._on_ping,
            "hello": self._on_hello,
            "heartbeat": self._on_heartbeat,
            "snapshot": self._on_snapshot,
            "status": self._on_status,
            "claim": self._on_claim,
            "release": self._on_release,
            "renew": self._on_renew,
            "cancel": self._on_cancel,
            "leave": self._on_leave,
            "force_release": self._on_force_release,
            "unbind": self._on_unbind,
        }
        if os.environ.get(TEST_HOOKS_ENV) == "1":
            self._handlers["test.clock"] = self._on_test_clock
            self._handlers["test.failpoint"] = self._on_test_failpoint
        self._arming: set[str] = set()
        self.facts = FactService(self)
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.pub = self.ctx.socket(zmq.PUB)
        self.store: Store | None = None
        self.pub_endpoint = ""
        self.url = config.url
        self._ipc_files: list[Path] = []
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None

    # -- start and stop -------------------------------------------------------

    def start(self) -> None:
        """Open the store, restore state, start a new epoch, bind the sockets."""
        self.config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = Store(self.config.db_path, synchronous=self.config.synchronous)
        self.epoch = self.store.bump_epoch()
        self.store.checkpoint_in_background(CHECKPOINT_INTERVAL_S)
        self._restore()
        self._bind()
        self._serve_metrics()
        self.log.info(
            "broker.started",
            url=self.url,
            pub=self.pub_endpoint,
            epoch=self.epoch,
            data=str(self.config.data_dir),
            repos=len(self.tables),
            sessions=len(self.session_repo),
        )

    def _restore(self) -> None:
        assert self.store is not None
        now = self._now()
        self.tables.clear()
        self.sequences.clear()
        self.session_repo.clear()
        for repo, state in self.store.load().items():
            sequence = Sequence(state.seq, state.heads)
            table = ClaimTable(repo, sequence, self.limits)
            table.restore(
                state.sessions, state.claims, grace_s=self.config.grace_s, now=now
            )
            self.sequences[repo] = sequence
            self.tables[repo] = table
            for session in state.sessions:
                self.session_repo[session.sid] = repo
        self.facts.restore()
        self._warming = set(self.tables)
        self._reschedule_all()
        self._replies.clear()
        since = now.wall - self.config.request_memory_s
        for key, reply in self.store.load_requests(since).items():
            self._replies[key] = (now.wall, reply)
        self.security.load_owners(self.store.db)

    def _bind(self) -> None:
        for sock in (self.router, self.pub):
            sock.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # Past this size libzmq drops the connection: too large to even answer.
        self.router.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES * 16)
        self.pub.setsockopt(zmq.SNDHWM, self.config.pub_hwm)
        self.security.secure(self.ctx, [self.router, self.pub])
        old_umask = os.umask(0o077)
        try:
            _prepare_ipc(self.config.url)
            self.router.bind(self.config.url)
            self._note_ipc(self.config.url)
            pub_url = self.config.pub_url or _default_pub_url(self.config.url)
            _prepare_ipc(pub_url)
            self.pub.bind(pub_url)
            self._note_ipc(pub_url)
        finally:
            os.umask(old_umask)
        # What was bound, with the port chosen for "tcp://HOST:0" filled in.
        self.url = _last_endpoint(self.router)
        self.pub_endpoint = _last_endpoint(self.pub)

    def _note_ipc(self, url: str) -> None:
        """Remember a socket file this broker bound, to remove it on close."""
        if url.startswith("ipc://"):
            self._ipc_files.append(Path(url[len("ipc://") :]))

    def _serve_metrics(self) -> None:
        if self.config.metrics is None:
            return
        host, port = split_hostport(self.config.metrics, "--metrics")
        try:
            self.metrics_server = MetricsServer(host, port, self._scrape)
        except OSError as exc:
            raise BadInput(
                f"cannot serve metrics on {self.config.metrics}: {exc}"
            ) from exc
        self.metrics_server.start()
        bound_host, bound_port = self.metrics_server.address
        self.log.info("metrics.listening", host=bound_host, port=bound_port)

    def _scrape(self) -> str:
        """The exposition text; runs on the metrics thread, so it only reads."""
        tables = list(self.tables.values())
        gauges: list[Gauge] = [
            ("fleetbus_epoch", "Broker epoch (starts so far).", self.epoch),
            ("fleetbus_start_time_seconds", "Wall time of the start.", self.started),
            ("fleetbus_repos", "Repositories with a claim table.", len(tables)),
            (
                "fleetbus_sessions",
                "Sessions joined.",
                sum(len(t.view.sessions) for t in tables),
            ),
            (
                "fleetbus_claims_held",
                "Claim rows held.",
                sum(len(t.view) for t in tables),
            ),
            (
                "fleetbus_claims_waiting",
                "Claim requests queued.",
                sum(len(t.view.waiters) for t in tables),
            ),
        ]
        return self.metrics.render(gauges)

    def stop(self) -> None:
        """Ask the loop to finish its turn and return."""
        self._stopping = True

    def close(self) -> None:
        """Close sockets and the store."""
        self.router.close(linger=0)
        self.pub.close(linger=0)
        for path in self._ipc_files:
            path.unlink(missing_ok=True)
        self.security.close()
        self.ctx.term()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.store is not None:
            self.store.close()
        self.log.info("broker.stopped", epoch=self.epoch)

    # -- the loop ---------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until :meth:`stop` is called or SIGTERM/SIGINT arrives."""
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno())
        previous = {
            sig: signal.signal(sig, lambda *_: self.stop())
            for sig in (signal.SIGTERM, signal.SIGINT)
        }
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(wake_r.fileno(), zmq.POLLIN)
        next_heartbeat = self.clock.monotonic()
        try:
            while not self._stopping:
                timeout_ms = self._poll_timeout(next_heartbeat)
                ready = dict(poller.poll(timeout_ms))
                if not ready:
                    self._idle()
                if wake_r.fileno() in ready:
                    _drain_fd(wake_r)
                self.turn(drain=self.router in ready)
                if self.clock.monotonic() >= next_heartbeat:
                    self._heartbeats()
                    next_heartbeat = (
                        self.clock.monotonic()
                        + self.config.heartbeat_interval_ms / 1000
                    )
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()

    def _poll_timeout(self, next_heartbeat: float) -> int:
        if self._warming:
            return 0
        now = self.clock.monotonic()
        first = self.wakeups.first()
        due = next_heartbeat if first is None else min(next_heartbeat, first)
        return max(0, min(1000, int((due - now) * 1000) + 1))

    def turn(self, *, drain: bool = True) -> None:
        """One turn: requests that are ready, due deadlines, commit, send."""
        if drain:
            drained = 0
            for _ in range(self.config.max_batch):
                try:
                    frames = self._receive()
                except zmq.Again:
                    break
                drained += 1
                self._handle(frames)
            if drained:
                self.metrics.batch(drained)
        self._tick()
        self._flush()
        self.metrics.replied()
        if self.store is not None and self.store.commits >= CHECKPOINT_COMMITS:
            self._checkpoint()

    def _idle(self) -> None:
        """Work left for a quiet moment: the store's log, restored indexes.

        Indexes are built a slice at a time, so that a request arriving
        meanwhile waits for one slice, not for all of them.
        """
        if self.store is not None and self.store.commits:
            self._checkpoint()
        for repo in list(self._warming):
            table = self.tables.get(repo)
            if table is None or table.view.warm(WARM_SLICE):
                self._warming.discard(repo)

    def _checkpoint(self) -> None:
        """Copy the store's log back now that this turn's replies are out."""
        assert self.store is not None
        try:
            self.store.checkpoint()
        except Exception as exc:
            self.log.error("store.checkpoint_failed", error=str(exc))

    def _tick(self) -> None:
        """Run the timed work that is due, in the repositories it is due in."""
        now = self._now()
        self._reschedule(now)
        for repo in self.wakeups.pop_due(now.mono):
            table = self.tables.get(repo)
            if table is not None:
                deadline = table.next_deadline()
                ttl = table.next_ttl()
                if (deadline is not None and deadline <= now.mono) or (
                    ttl is not None and ttl <= now.wall
                ):
                    self._absorb(repo, table.tick(now), now)
            self.facts.tick(repo, now.wall)
            self._changed.add(repo)
        self._reschedule(now)

    def changed(self, repo: str) -> None:
        """Note that ``repo``'s timed work may have moved (see :meth:`_tick`)."""
        self._changed.add(repo)

    def _reschedule(self, now: Now) -> None:
        """Set the next due time of every repository changed since the last."""
        changed, self._changed = self._changed, set()
        for repo in changed:
            self._schedule(repo, now)

    def _reschedule_all(self) -> None:
        """Set every repository's next due time afresh: after a restore, at
        each heartbeat (the wall clock may have jumped), after a clock shift."""
        now = self._now()
        self._changed.clear()
        self.wakeups = Wakeups()
        for repo in {*self.tables, *self.facts.tables}:
            self._schedule(repo, now)

    def _schedule(self, repo: str, now: Now) -> None:
        """Set ``repo``'s next due time, on the monotonic clock."""
        times = []
        table = self.tables.get(repo)
        if table is not None:
            deadline = table.next_deadline()
            if deadline is not None:
                times.append(deadline)
            ttl = table.next_ttl()
            if ttl is not None:
                times.append(now.mono + (ttl - now.wall))
        facts_due = self.facts.next_due(repo)
        if facts_due is not None:
            times.append(now.mono + (facts_due - now.wall))
        self.wakeups.set(repo, min(times, default=None))

    def _flush(self) -> None:
        if not self._outbox and not self._events and not self._dirty:
            return
        assert self.store is not None
        try:
            for repo in self._dirty:
                sequence = self.sequences[repo]
                self.store.begin()
                self.store.save_sequence(repo, sequence.seq, sequence.take_changed())
            self._failpoint("before_commit")
            started = time.perf_counter()
            self.store.commit()
            self.metrics.committed(time.perf_counter() - started)
        except Exception as exc:
            self._store_failed(exc)
            return
        self._dirty.clear()
        self._write_logs()
        self._failpoint("after_commit")
        send = self.router.send
        for ident, _rid, body in self._outbox:
            send(ident, _SNDMORE)
            send(body)
        self._outbox.clear()
        self._failpoint("after_reply")
        publish = self.pub.send
        for frames in _by_topic(self._events):
            last = len(frames) - 1
            for index, frame in enumerate(frames):
                publish(frame, _SNDMORE if index < last else 0)
        self.metrics.sent(self._events)
        self._events.clear()
        self._failpoints |= self._arming
        self._arming.clear()

    def _store_failed(self, exc: Exception) -> None:
        """Undo the batch: roll back, reload from the store, answer with errors."""
        assert self.store is not None
        self.log.error("store.write_failed", error=str(exc))
        self.metrics.store_failures += 1
        try:
            self.store.rollback()
        except Exception as rollback_exc:
            self.log.error("store.rollback_failed", error=str(rollback_exc))
        failure = BrokerUnavailable(f"the broker could not store the change: {exc}")
        failed = {(ident, rid) for ident, rid, _body in self._outbox}
        failed.update((ident, key[1]) for key, ident in self._waiting.items())
        for ident, rid in failed:
            self.router.send_multipart(
                [ident, wire.encode(wire.error(rid, failure.to_wire()))]
            )
        self._outbox.clear()
        self._events.clear()
        self._logs.clear()
        self._dirty.clear()
        self._waiting.clear()
        self._restore()

    def log_change(self, event: str, /, level: str = "info", **fields: Any) -> None:
        """Log the change ``event`` of this batch once its commit succeeds.

        A batch that fails to commit is rolled back, so its lines are dropped:
        the log names only what the store holds.
        """
        self._logs.append((level, event, fields))

    def _write_logs(self) -> None:
        for level, name, fields in self._logs:
            getattr(self.log, level)(name, **fields)
        self._logs.clear()

    def _receive(self) -> list[bytes]:
        """One request's frames; notes the sender's credential."""
        if not self.security.uses_curve:
            return self.router.recv_multipart(zmq.NOBLOCK)
        parts = self.router.recv_multipart(zmq.NOBLOCK, copy=False)
        self._credential = self.security.credential(parts[-1])
        return [part.bytes for part in parts]

    def _heartbeats(self) -> None:
        self.rates.prune(self.clock.monotonic())
        self._forget_replies()
        self._reschedule_all()
        if self.security.reload():
            self.log.info("security.reloaded", operators=len(self.security.operators))
        for repo, table in self.tables.items():
            if not table.view.sessions:
                continue
            sequence = self.sequences[repo]
            beat = {
                "type": "heartbeat",
                "repo": repo,
                "epoch": self.epoch,
                "seq": sequence.seq,
                "head": sequence.head(CLAIMS_STREAM),
                "at": self.clock.wall(),
            }
            facts = self.facts.tables.get(repo)
            if facts is None:
                beat["facts"] = 0
            elif facts.last_seq is not None:
                beat["facts"] = facts.last_seq
            self.pub.send_multipart([wire.claims_topic(repo), wire.encode(beat)])

    # -- requests -------------------------------------------------------------

    def _handle(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            if frames:
                self._reply(
                    frames[0],
                    None,
                    error=ProtocolError(
                        f"a request is one frame, got {len(frames) - 1}"
                    ),
                )
            return
        ident, frame = frames
        try:
            message = wire.decode(frame)
            rid = wire.request_id(message)
        except FleetbusError as exc:
            self._reply(ident, None, error=exc)
            return
        # One bucket per session of a peer: the SDK sends every session of a
        # process over one socket. Requests naming no known session share the
        # peer's bucket. A peer is a connection, or over CURVE its key: more
        # connections with one key get no more requests through.
        sid = message.get("sid")
        who: Hashable = self._credential if self.security.uses_curve else ident
        peer = (who, sid) if isinstance(sid, str) and sid in self.session_repo else who
        if not self.rates.admit(peer, time.monotonic()):
            self._reply(
                ident,
                rid,
                error=LimitExceeded(
                    "too many requests from this session; slow down", limit="rate"
                ),
            )
            return
        op = message.get("op")
        handler = self._handlers.get(op) if isinstance(op, str) else None
        if handler is None:
            self._reply(ident, rid, error=ProtocolError(f"unknown op {op!r}"))
            return
        self.log.debug("request.received", op=op, rid=rid)
        self.metrics.received(str(op))
        try:
            handler(ident, rid, message)
        except FleetbusError as exc:
            self._reply(ident, rid, error=exc)
        except Exception as exc:
            self.log.exception("request.crashed", op=op, rid=rid)
            self._reply(
                ident, rid, error=FleetbusError(f"internal error handling {op}: {exc}")
            )

    def _reply(
        self,
        ident: bytes,
        rid: str | None,
        fields: dict[str, Any] | None = None,
        *,
        error: FleetbusError | None = None,
        remember: tuple[str, str] | None = None,
    ) -> None:
        if error is not None:
            self.metrics.failed(error.code)
            body = wire.error(rid, error.to_wire())
        elif fields:
            body = {"rid": rid, "ok": True, **fields}
            if "facts" in fields:
                self.metrics.facts_delivered += len(fields["facts"])
        else:
            body = {"rid": rid, "ok": True}
        encoded = wire.encode(body)
        if remember is not None:
            self._remember(remember, encoded)
        self._outbox.append((ident, rid, encoded))

    def _remember(self, key: tuple[str, str], encoded: bytes) -> None:
        assert self.store is not None
        now = self.clock.wall()
        self.store.begin()
        # orjson's output keeps its whole growth buffer (4 KiB at least), and
        # what is kept for the retry window must hold only the reply's bytes.
        compact = bytes(memoryview(encoded))
        self.store.record_request(key[0], key[1], now, compact)
        self._replies[key] = (now, compact)
        self._replies.move_to_end(key)

    def _forget_replies(self) -> None:
        """Drop remembered replies past the retry window, in memory and stored.

        Runs between turns, so its own small transaction commits nothing else.
        """
        assert self.store is not None
        horizon = self.clock.wall() - self.config.request_memory_s
        while self._replies:
            first = next(iter(self._replies.values()))
            if first[0] >= horizon:
                break
            self._replies.popitem(last=False)
        try:
            self.store.begin()
            self.store.prune_requests(horizon)
            self.store.commit()
        except Exception as exc:
            self.log.error("store.prune_failed", error=str(exc))
            with contextlib.suppress(Exception):
                self.store.rollback()

    def _replay(self, ident: bytes, sid: str, rid: str) -> bool:
        """Answer a retried mutating request with its first reply."""
        known = self._replies.get((sid, rid))
        if known is None:
            return False
        self._outbox.append((ident, rid, known[1]))
        return True

    def _absorb(self, repo: str, outcome: Outcome, now: Now | None = None) -> None:
        """Take a table's outcome: persist and queue its events and late replies.

        ``now`` is the time the outcome was decided at, when the caller has it.
        """
        assert self.store is not None
        self._changed.add(repo)
        if outcome.events:
            self.store.begin()
            self.store.apply_claim_events(repo, outcome.events)
            self._dirty.add(repo)
            topic = wire.claims_topic(repo)
            wall = self.clock.wall() if now is None else now.wall
            logged = self._log_changes
            for event in outcome.events:
                event["repo"] = repo
                event.setdefault("at", wall)
                self._track_session(repo, event)
                if logged:
                    self._log_event(event)
                self.metrics.event(event)
                self._events.append((topic, event))
            if outcome.lost:
                self.facts.warn_lost(repo, outcome.lost)
        for sid, rid, reply in outcome.deferred:
            ident = self._waiting.pop((sid, rid), None)
            body = {"rid": rid, **reply}
            encoded = wire.encode(body)
            self._remember((sid, rid), encoded)
            if ident is not None:
                self._outbox.append((ident, rid, encoded))

    def _track_session(self, repo: str, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "session.joined":
            self.session_repo[event["session"]["sid"]] = repo
        elif kind in ("session.left", "session.lost"):
            self.session_repo.pop(event["sid"], None)
            for key in [k for k in self._waiting if k[0] == event["sid"]]:
                self._waiting.pop(key, None)

    def _log_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        if kind == "claim.released" and event.get("reason") in _EXPIRY_REASONS:
            kind = "claim.expired"
        if kind.startswith("wait."):
            self.log_change(kind, level="debug", sid=event.get("sid"), seq=event["seq"])
            return
        fields = {k: v for k, v in event.items() if k in _LOGGED_KEYS}
        if kind == "session.joined":
            fields["sid"] = event["session"]["sid"]
            fields["name"] = event["session"]["name"]
        self.log_change(kind, **fields)

    # -- handlers -------------------------------------------------------------

    def _session(self, message: dict[str, Any]) -> tuple[str, ClaimTable]:
        """The session a request names and its table, its lease renewed."""
        sid, table, _now = self._session_at(message)
        return sid, table

    def _session_at(self, message: dict[str, Any]) -> tuple[str, ClaimTable, Now]:
        """:meth:`_session`, and the time the request is handled at."""
        sid = _text(message, "sid", MAX_NAME_LEN)
        self.security.check(sid, self._credential)
        repo = self.session_repo.get(sid)
        if repo is None:
            raise UnknownSession(
                f"session {sid!r} is not known to the broker; join with hello first",
                sid=sid,
            )
        table = self.tables[repo]
        now = self._now()
        table.touch(sid, now)
        self._changed.add(repo)
        return sid, table, now

    def _on_ping(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        self._reply(
            ident,
            rid,
            {"epoch": self.epoch, "version": __version__, "time": self.clock.wall()},
        )

    def _on_hello(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        repo = _text(message, "repo", MAX_REPO_LEN)
        sid = _text(message, "sid", MAX_NAME_LEN)
        name = _text(message, "name", MAX_NAME_LEN, default=sid)
        meta = message.get("meta") or {}
        if not isinstance(meta, dict):
            raise BadInput("'meta' must be an object", field="meta")
        leased = message.get("lease", True)
        if not isinstance(leased, bool):
            raise BadInput("'lease' must be true or false", field="lease")
        self.security.check(sid, self._credential)
        known = self.session_repo.get(sid)
        if known is not None and known != repo:
            raise BadInput(
                f"session {sid!r} belongs to another repository", field="sid"
            )
        table = self._table(repo)
        outcome = table.join(
            sid,
            name,
            meta,
            leased=leased,
            lease_s=self.config.lease_ms / 1000,
            now=self._now(),
        )
        self.store_begin()
        self.security.bind(sid, self._credential)
        self._absorb(repo, outcome)
        sequence = self.sequences[repo]
        self._reply(
            ident,
            rid,
            {
                "epoch": self.epoch,
                "seq": sequence.seq,
                "head": sequence.head(CLAIMS_STREAM),
                "lease_ms": self.config.lease_ms,
                "heartbeat_ms": max(1, self.config.lease_ms // 3),
                "pub": self.pub_endpoint,
                "version": __version__,
                **(outcome.reply or {}),
            },
        )

    def _table(self, repo: str) -> ClaimTable:
        table = self.tables.get(repo)
        if table is None:
            sequence = Sequence()
            table = ClaimTable(repo, sequence, self.limits)
            self.sequences[repo] = sequence
            self.tables[repo] = table
        return table

    def _on_heartbeat(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        _sid, table = self._session(message)
        sequence = self.sequences[table.repo]
        self._reply(
            ident, rid, {"epoch": self.epoch, "head": sequence.head(CLAIMS_STREAM)}
        )

    def _on_snapshot(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        repo = _text(message, "repo", MAX_REPO_LEN)
        self.check_repo(message, repo)
        self.metrics.snapshots += 1
        table = self.tables.get(repo)
        sequence = self.sequences.get(repo) or Sequence()
        compact = message.get("compact") is True
        state = (
            table.snapshot(compact=compact)
            if table is not None
            else _empty_snapshot(compact)
        )
        self._reply(
            ident,
            rid,
            {
                "epoch": self.epoch,
                "seq": sequence.seq,
                "head": sequence.head(CLAIMS_STREAM),
                **state,
            },
        )

    def _on_status(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        repos = {
            repo: {
                "sessions": len(table.view.sessions),
                "claims": len(table.view.claims()),
                "waiters": len(table.view.waiters),
                "seq": self.sequences[repo].seq,
                "indexing": repo in self._warming,
            }
            for repo, table in self.tables.items()
            if self.may_read(repo)
        }
        if message.get("repo") is not None:
            self.check_repo(message, _text(message, "repo", MAX_REPO_LEN))
        self._reply(
            ident,
            rid,
            {
                "epoch": self.epoch,
                "version": __version__,
                "started": self.started,
                "url": self.url,
                "pub": self.pub_endpoint,
                "data_dir": str(self.config.data_dir),
                "repos": repos,
            },
        )

    def _on_claim(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        sid, table, now = self._session_at(message)
        if self._replay(ident, sid, rid):
            return
        if table.is_waiting(sid, rid):
            self._waiting[(sid, rid)] = ident
            self._reply(ident, rid, {"queued": True})
            return
        scopes = _scopes(message)
        mode = message.get("mode", "exclusive")
        if mode not in ("exclusive", "shared"):
            raise BadInput("'mode' must be 'exclusive' or 'shared'", field="mode")
        intent = _text(message, "intent", self.limits.intent_len, default="")
        ttl_s = _seconds(message, "ttl_ms")
        wait_s = _seconds(message, "wait_ms")
        try:
            outcome = table.claim(
                sid,
                scopes,
                mode=mode,
                intent=intent,
                ttl_s=ttl_s,
                wait_s=wait_s,
                rid=rid,
                now=now,
            )
        except FleetbusError as exc:
            self.metrics.refused(exc.code)
            self.log.info(
                f"claim.{'refused' if exc.code != 'deadlock' else 'deadlock'}",
                repo=table.repo,
                sid=sid,
                scopes=[s.text for s in scopes],
                code=exc.code,
            )
            if exc.exit_code == 1:
                self._reply(ident, rid, error=exc, remember=(sid, rid))
                return
            raise
        self._absorb(table.repo, outcome, now)
        if outcome.queued is not None:
            self._waiting[(sid, rid)] = ident
            self.log_change(
                "claim.queued",
                repo=table.repo,
                sid=sid,
                scopes=[s.text for s in scopes],
                position=outcome.queued,
            )
            self._reply(ident, rid, {"queued": True, "position": outcome.queued})
            return
        self._reply(ident, rid, outcome.reply, remember=(sid, rid))

    def _on_release(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        sid, table, now = self._session_at(message)
        if self._replay(ident, sid, rid):
            return
        scopes = _scopes(message) if message.get("scopes") is not None else None
        outcome = table.release(
            sid,
            scopes=scopes,
            grant=_optional_text(message, "grant"),
            ids=_optional_ids(message),
            all=message.get("all") is True,
            now=now,
        )
        self._absorb(table.repo, outcome, now)
        self._reply(ident, rid, outcome.reply, remember=(sid, rid))

    def _on_renew(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        sid, table, now = self._session_at(message)
        if self._replay(ident, sid, rid):
            return
        ttl_s = _seconds(message, "ttl_ms")
        if ttl_s is None:
            raise BadInput("renew needs 'ttl_ms'", field="ttl_ms")
        outcome = table.renew(
            sid,
            grant=_optional_text(message, "grant"),
            ids=_optional_ids(message),
            ttl_s=ttl_s,
            now=now,
        )
        self._absorb(table.repo, outcome, now)
        self._reply(ident, rid, outcome.reply, remember=(sid, rid))

    def _on_cancel(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        """Withdraw a claim request: end its wait, or release what it was granted."""
        sid, table = self._session(message)
        if self._replay(ident, sid, rid):
            return
        target = _text(message, "wait", wire.MAX_ID_LEN)
        now = self._now()
        outcome = table.cancel(sid, target, now=now)
        cancelled = bool((outcome.reply or {}).get("cancelled"))
        grant = None if cancelled else _granted(self._replies.get((sid, target)))
        if grant is not None:
            outcome = table.release(sid, grant=grant, now=now)
        self._absorb(table.repo, outcome)
        released = (outcome.reply or {}).get("released", [])
        reply = {"cancelled": cancelled, "released": released}
        self._reply(ident, rid, reply, remember=(sid, rid))

    def _on_leave(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        sid, table = self._session(message)
        if self._replay(ident, sid, rid):
            return
        outcome = table.leave(sid, self._now())
        self._absorb(table.repo, outcome)
        self._reply(ident, rid, outcome.reply or {}, remember=(sid, rid))

    def _operator_request(
        self, op: str, ident: bytes, rid: str, message: dict[str, Any]
    ) -> tuple[str, tuple[str, str]] | None:
        """An operator's request: its ``by`` and the key its reply is kept
        under, or None when it was a retry, answered with the first reply."""
        if not self.security.is_operator(self._credential):
            raise NotAuthorised(f"{op} is for operators only")
        by = _text(message, "by", MAX_NAME_LEN, default=self._credential)
        key = (f"operator:{self._credential}", rid)
        if self._replay(ident, key[0], rid):
            return None
        return by, key

    def _on_force_release(
        self, ident: bytes, rid: str, message: dict[str, Any]
    ) -> None:
        """Release any session's claims, for an operator; logged and published."""
        asked = self._operator_request("force_release", ident, rid, message)
        if asked is None:
            return
        by, key = asked
        repo = _text(message, "repo", MAX_REPO_LEN)
        table = self.tables.get(repo)
        if table is None:
            raise BadInput(f"no repository {repo!r} at this broker", field="repo")
        scopes = _scopes(message) if message.get("scopes") is not None else None
        outcome = table.force_release(
            scopes=scopes, ids=_optional_ids(message), by=by, now=self._now()
        )
        self.log_change(
            "claim.force_released",
            level="warning",
            repo=repo,
            by=by,
            credential=self._credential,
            ids=(outcome.reply or {}).get("released", []),
        )
        self._absorb(repo, outcome)
        self._reply(ident, rid, outcome.reply, remember=key)

    def _on_unbind(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        """Free a session id from the credential that opened it, for an operator.

        The next credential to open the session owns it, with its claims and
        its facts; a key that was replaced needs this to act as its old ids.
        """
        asked = self._operator_request("unbind", ident, rid, message)
        if asked is None:
            return
        by, key = asked
        target = _text(message, "target", MAX_NAME_LEN)
        if not self.security.uses_curve:
            raise BadInput(
                "this broker binds no session to a credential (it runs without "
                "CURVE): there is nothing to unbind",
                field="target",
            )
        owner = self.security.owners.get(target)
        if owner is None:
            raise BadInput(
                f"session {target!r} is bound to no credential", field="target"
            )
        self.store_begin()
        self.security.unbind(target)
        self.log_change(
            "session.unbound",
            level="warning",
            sid=target,
            was=owner,
            by=by,
            credential=self._credential,
        )
        reply = {"unbound": target, "live": target in self.session_repo}
        self._reply(ident, rid, reply, remember=key)

    def _on_test_clock(self, ident: bytes, rid: str, message: dict[str, Any]) -> None:
        """Shift the broker's clocks (fault tests only; needs the test-hooks env)."""
        if not isinstance(self.clock, OffsetClock):
            raise BadInput("this broker's clock cannot be shifted")
        wall = _seconds(message, "wall_ms") or 0.0
        mono = _seconds(message, "monotonic_ms") or 0.0
        if message.get("back") is True:
            wall = -wall
        self.clock.wall_offset += wall
        self.clock.monotonic_offset += mono
        self._reschedule_all()
        self.log.warning("test.clock_shifted", wall=wall, monotonic=mono)
        self._reply(
            ident,
            rid,
            {
                "wall_offset": self.clock.wall_offset,
                "monotonic_offset": self.clock.monotonic_offset,
            },
        )

    def _on_test_failpoint(
        self, ident: bytes, rid: str, message: dict[str, Any]
    ) -> None:
        """Arm a failpoint from the next commit on (fault tests only)."""
        point = message.get("point")
        if point not in ("before_commit", "after_commit", "after_reply"):
            raise BadInput("unknown failpoint", field="point")
        self._arming.add(point)
        self._reply(ident, rid, {"armed": point})

    # -- access -----------------------------------------------------------------

    def may_read(self, repo: str) -> bool:
        """Whether the current request's credential may read ``repo``."""
        credential = self._credential
        if self.security.may_read_all(credential):
            return True
        # Over the repository's live sessions: the bindings of every session
        # the broker ever served are many more.
        table = self.tables.get(repo)
        owners = self.security.owners
        return table is not None and any(
            owners.get(sid) == credential and self.session_repo.get(sid) == repo
            for sid in table.view.sessions
        )

    def check_repo(self, message: dict[str, Any], repo: str) -> None:
        """Refuse a request that reads ``repo`` from outside it.

        A request naming a session stays in that session's repository; one
        without may read only where its credential may (see
        :meth:`BrokerSecurity.may_read`).
        """
        sid = message.get("sid")
        home = self.session_repo.get(sid) if isinstance(sid, str) else None
        if home is not None and not self.security.cross_repo:
            self.security.check(str(sid), self._credential)
            if home != repo:
                raise NotAuthorised(
                    "a session may not read another repository", repo=repo
                )
            return
        if not self.may_read(repo):
            raise NotAuthorised(
                "this credential may not read that repository", repo=repo
            )

    def store_begin(self) -> None:
        """Open the batch's transaction, for writes outside the claim tables."""
        assert self.store is not None
        self.store.begin()

    # -- helpers --------------------------------------------------------------

    def _now(self) -> Now:
        return Now(wall=self.clock.wall(), mono=self.clock.monotonic())

    def _failpoint(self, name: str) -> None:
        if name in self._failpoints:
            self.log.warning("failpoint.hit", point=name)
            os.kill(os.getpid(), signal.SIGKILL)


# Plain ints: flag arithmetic on pyzmq's enums costs more than the send itself.
_SNDMORE = int(zmq.SNDMORE)

_LOGGED_KEYS = {"sid", "seq", "grant", "fence", "reason", "ids", "repo"}


def _granted(known: tuple[float, bytes] | None) -> str | None:
    """The grant id in a remembered claim reply, if it granted one."""
    if known is None:
        return None
    reply = wire.decode(known[1], limit=wire.MAX_BROKER_MESSAGE_BYTES)
    grant = reply.get("grant") if reply.get("ok") else None
    return grant if isinstance(grant, str) else None


def _by_topic(events: list[tuple[bytes, dict[str, Any]]]) -> list[list[bytes]]:
    """The batch's events as messages: each run on one topic in one message.

    A subscriber then decodes several events per receive, and the publisher
    copies one message, not one per event, to each subscriber's pipe.
    """
    messages: list[list[bytes]] = []
    for topic, event in events:
        if not messages or messages[-1][0] != topic:
            messages.append([topic])
        messages[-1].append(wire.encode(event))
    return messages


def _empty_snapshot(compact: bool) -> dict[str, Any]:
    rows = "claim_groups" if compact else "claims"
    return {"sessions": [], rows: [], "waiters": []}


def _text(
    message: dict[str, Any], key: str, limit: int, *, default: str | None = None
) -> str:
    value = message.get(key, default)
    if value is None and default is None:
        raise BadInput(f"request needs '{key}'", field=key)
    if not isinstance(value, str):
        raise BadInput(f"'{key}' must be a string", field=key)
    if len(value) > limit:
        raise BadInput(f"'{key}' is longer than {limit} characters", field=key)
    if key in ("sid", "repo") and not value:
        raise BadInput(f"'{key}' must not be empty", field=key)
    return value


def _optional_text(message: dict[str, Any], key: str) -> str | None:
    if message.get(key) is None:
        return None
    return _text(message, key, MAX_NAME_LEN)


def _optional_ids(message: dict[str, Any]) -> list[str] | None:
    ids = message.get("ids")
    if ids is None:
        return None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise BadInput("'ids' must be a list of strings", field="ids")
    return ids


def _scopes(message: dict[str, Any]) -> list[Scope]:
    raw = message.get("scopes")
    if not isinstance(raw, list) or not raw:
        raise BadInput("'scopes' must be a non-empty list of strings", field="scopes")
    if not all(isinstance(s, str) for s in raw):
        raise BadInput("every scope must be a string", field="scopes")
    return [parse_scope(s) for s in raw]


def _seconds(message: dict[str, Any], key: str) -> float | None:
    value = message.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadInput(f"'{key}' must be a number of milliseconds", field=key)
    if not 0 <= value <= 366 * 86_400_000:
        raise BadInput(f"'{key}' is out of range", field=key)
    return float(value) / 1000


def _security(config: BrokerConfig) -> BrokerSecurity:
    curve = None
    if config.curve_secret is not None or config.curve_allow is not None:
        if config.curve_secret is None or config.curve_allow is None:
            raise BadInput("CURVE needs both --curve-secret and --curve-allow")
        curve = CurveSettings(
            config.curve_secret, config.curve_allow, config.curve_operators
        )
    return BrokerSecurity(
        curve, local_operator=config.local_operator, cross_repo=config.cross_repo
    )


def _parse_failpoints(text: str) -> set[str]:
    return {p.strip() for p in text.split(",") if p.strip()}


def _default_pub_url(url: str) -> str:
    if url.startswith("ipc://"):
        return url + ".pub"
    if url.startswith("tcp://"):
        host = url[len("tcp://") :].rsplit(":", 1)[0]
        return f"tcp://{host}:*"
    raise BadInput(f"unsupported broker URL {url!r}: use ipc:// or tcp://")


def _last_endpoint(sock: zmq.Socket[bytes]) -> str:
    endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
    return endpoint.decode() if isinstance(endpoint, bytes) else str(endpoint)


def _prepare_ipc(url: str) -> None:
    """Make the socket's directory private and clear a stale socket file.

    A socket file that a live process still listens on is left alone: binding
    over it would silently steal a running broker's clients.
    """
    if not url.startswith("ipc://"):
        return
    path = Path(url[len("ipc://") :])
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()
        return
    finally:
        probe.close()
    raise BrokerUnavailable(f"another process is already serving on {url}")


def _drain_fd(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except OSError:
        pass


def run(config: BrokerConfig) -> int:
    """Run a broker in the foreground until SIGTERM or SIGINT; return an exit code."""
    log.configure(config.log_level, json=config.log_json)
    broker = Broker(config)
    try:
        broker.start()
    except (StoreError, BadInput, BrokerUnavailable, zmq.ZMQError, OSError) as exc:
        broker.log.error("broker.start_failed", error=str(exc))
        broker.close()
        return 4 if isinstance(exc, StoreError) else 3
    try:
        broker.serve_forever()
    finally:
        broker.close()
    return 0
