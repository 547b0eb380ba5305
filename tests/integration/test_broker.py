"""The broker process itself: bad requests, limits, heartbeats and shutdown."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from fleetbus import wire
from fleetbus.client import connect
from fleetbus.repo import RepoInfo
from tests.support.brokerproc import BrokerProcess

REPLY_TIMEOUT_MS = 10_000


class Raw:
    """A bare DEALER speaking to the broker, one request at a time."""

    def __init__(self, url: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(url)
        self.count = 0

    def frames(self, *frames: bytes) -> dict[str, Any]:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(REPLY_TIMEOUT_MS), "the broker did not answer"
        reply: dict[str, Any] = orjson.loads(self.sock.recv())
        return reply

    def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        self.count += 1
        body = {"op": op, "rid": f"r{self.count}", **fields}
        return self.frames(orjson.dumps(body))

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(broker: BrokerProcess) -> Iterator[Raw]:
    client = Raw(broker.url)
    yield client
    client.close()


def code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


@pytest.mark.parametrize(
    ("frames", "expected"),
    [
        ((b"not json",), "protocol"),
        ((b"\xff\xfe",), "protocol"),
        ((b"[1, 2]",), "protocol"),
        ((b'{"op": "ping"}',), "protocol"),
        ((b'{"op": "launch", "rid": "r"}',), "protocol"),
        ((b'{"op": "claim", "rid": "r", "sid": 5}',), "bad_input"),
        ((b'{"op": "claim", "rid": "r", "sid": "ghost"}',), "unknown_session"),
        ((b'{"op": "hello", "rid": "r", "repo": [], "sid": "s"}',), "bad_input"),
        ((b"two", b"frames"), "protocol"),
        ((orjson.dumps({"op": "ping", "rid": "r", "pad": "x" * 300_000}),), "limit"),
    ],
)
def test_bad_request_gets_an_error_and_the_broker_serves_on(
    raw: Raw, broker: BrokerProcess, frames: tuple[bytes, ...], expected: str
) -> None:
    """Undecodable, mistyped, unknown or oversized: an error reply, then service."""
    assert code(raw.frames(*frames)) == expected

    assert raw.ask("ping")["ok"] is True
    assert broker.proc is not None
    assert broker.proc.poll() is None


def test_limits_refuse_and_disturb_nothing(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """Scopes per claim, claims per session, sessions per repo: each a limit error."""
    # A lease long enough that no session of the test runs out meanwhile.
    raw = Raw(broker_factory("long", lease_ms=120_000).url)
    try:
        _fill_to_the_limits(raw)
    finally:
        raw.close()


def _fill_to_the_limits(raw: Raw) -> None:
    assert raw.ask("hello", repo="r", sid="s")["ok"]
    kept = raw.ask("claim", sid="s", scopes=["@kept"])["grant"]
    scopes = [f"@x{n}" for n in range(65)]

    too_many_scopes = raw.ask("claim", sid="s", scopes=scopes)
    for chunk in range(63):
        batch = [f"@c{chunk}.{n}" for n in range(64)]
        assert raw.ask("claim", sid="s", scopes=batch)["ok"]
    assert raw.ask("claim", sid="s", scopes=[f"@last{n}" for n in range(63)])["ok"]
    too_many_claims = raw.ask("claim", sid="s", scopes=["@one"])
    for n in range(1, 1024):
        assert raw.ask("hello", repo="r", sid=f"s{n}")["ok"]
    too_many_sessions = raw.ask("hello", repo="r", sid="late")

    assert too_many_scopes["error"]["limit"] == "scopes_per_claim"
    assert too_many_claims["error"]["limit"] == "claims_per_session"
    assert too_many_sessions["error"]["limit"] == "sessions_per_repo"
    assert raw.ask("hello", repo="other", sid="late")["ok"]
    snapshot = raw.ask("snapshot", repo="r")
    assert len(snapshot["claims"]) == 4096
    assert kept in {row["grant"] for row in snapshot["claims"]}


def test_heartbeat_carries_the_head(
    broker_factory: Callable[..., BrokerProcess],
) -> None:
    """The broker's heartbeat names the head, so an idle client sees a gap."""
    broker = broker_factory("long", lease_ms=120_000)
    raw = Raw(broker.url)
    try:
        beat, fence = _first_heartbeat(raw)
    finally:
        raw.close()

    assert (beat["epoch"], beat["head"]) == (broker.epoch, fence)


def _first_heartbeat(raw: Raw) -> tuple[dict[str, Any], int]:
    hello = raw.ask("hello", repo="r", sid="s")
    fence = raw.ask("claim", sid="s", scopes=["@db"])["fence"]
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, wire.claims_topic("r"))
    sub.connect(hello["pub"])
    try:
        # The grant's own event may still be on its way; a heartbeat follows.
        while True:
            assert sub.poll(REPLY_TIMEOUT_MS), "no heartbeat"
            beat: dict[str, Any] = orjson.loads(sub.recv_multipart()[1])
            if beat["type"] == "heartbeat":
                return beat, fence
    finally:
        sub.close(linger=0)


def test_compact_and_plain_snapshots_hold_the_same_rows(raw: Raw) -> None:
    """A snapshot asked ``compact`` carries the same claims as the plain one."""
    from fleetbus.claims import ClaimView

    assert raw.ask("hello", repo="snap", sid="a")["ok"]
    assert raw.ask("hello", repo="snap", sid="b")["ok"]
    assert raw.ask("claim", sid="a", scopes=["src/x.py", "src/y.py"])["ok"]
    assert raw.ask("claim", sid="b", scopes=["docs/**"], mode="shared")["ok"]
    empty = raw.ask("snapshot", repo="nowhere", compact=True)
    plain = raw.ask("snapshot", repo="snap")
    compact = raw.ask("snapshot", repo="snap", compact=True)
    again = raw.ask("snapshot", repo="snap", compact=True)

    assert empty["claim_groups"] == []
    assert "claims" not in empty
    assert "claim_groups" not in plain
    assert "claims" not in compact
    assert compact == {**again, "rid": compact["rid"]}
    views = []
    for reply in (plain, compact):
        view = ClaimView()
        view.load(reply)
        views.append(sorted((c.id, c.sid, c.scope.text, c.mode) for c in view.claims()))
    assert views[0] == views[1]
    assert {row[2] for row in views[0]} == {"src/x.py", "src/y.py", "docs/"}
    assert compact["head"] == plain["head"] == compact["seq"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_broker_cleanly(
    broker_factory: Callable[..., BrokerProcess], sig: signal.Signals
) -> None:
    """SIGTERM or SIGINT: exit 0, a last log line, socket files gone, restartable."""
    broker = broker_factory()
    assert broker.proc is not None

    broker.proc.send_signal(sig)

    assert broker.wait() == 0
    assert '"event":"broker.stopped"' in broker.log()
    socket_file = Path(broker.url.removeprefix("ipc://"))
    assert not socket_file.exists()
    assert not Path(f"{socket_file}.pub").exists()
    assert broker.start().epoch == 2


def test_sdk_over_tcp_learns_the_event_port(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """On tcp:// port 0 the broker logs the port it took; that URL is enough."""
    broker = broker_factory("tcp", url="tcp://127.0.0.1:0")
    repo = RepoInfo(id="path:/tcp", root=tmp_path, branch=None)

    with (
        connect(broker.url, repo=repo, session_id="a") as a,
        connect(broker.url, repo=repo, session_id="b") as b,
    ):
        grant = a.claim("src/a.py", intent="over tcp")
        b.wait_synced(grant.fence)

        assert [row.intent for row in b.holders("src/a.py")] == ["over tcp"]
        assert not b.may_edit("src/a.py")
        assert a.status()["url"] == broker.url != "tcp://127.0.0.1:0"


def test_an_unusable_socket_path_exits_3_without_a_traceback(tmp_path: Path) -> None:
    """A socket directory that cannot be made is one log line and exit code 3."""
    url = "ipc:///proc/fleetbus-none/b.sock"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetbus.broker",
            "--url",
            url,
            "--data",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 3
    assert "Traceback" not in done.stderr
    assert '"event":"broker.start_failed"' in done.stderr


def test_a_claim_is_stamped_with_one_time(raw: Raw) -> None:
    """A grant's event is stamped at the time its rows were granted at."""
    hello = raw.ask("hello", repo="stamp", sid="s")
    sub: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, wire.claims_topic("stamp"))
    sub.connect(hello["pub"])
    try:
        # A subscription takes effect at some point after connect: claim
        # until a grant's event arrives (a heartbeat may come first).
        granted: dict[str, Any] = {}
        while granted.get("type") != "claim.granted":
            if sub.poll(50):
                granted = orjson.loads(sub.recv_multipart()[1])
            else:
                assert raw.ask("claim", sid="s", scopes=[f"f{raw.count}.py"])["ok"]
    finally:
        sub.close(linger=0)

    assert granted["type"] == "claim.granted"
    assert {row["since"] for row in granted["claims"]} == {granted["at"]}
