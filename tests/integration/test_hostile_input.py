"""Hostile and malformed input against a real broker process.

Whatever arrives, the broker stays up, answers with a specific error code, and
changes nothing: the claim table, the facts and the sequence are compared
before and after every refused request.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.faults.harness import Raw
from tests.support.brokerproc import BrokerProcess

REPO = "hostile-repo"
OPS = (
    "ping",
    "hello",
    "heartbeat",
    "snapshot",
    "status",
    "claim",
    "release",
    "renew",
    "leave",
    "cancel",
    "force_release",
    "publish",
    "retract",
    "facts",
    "unseen",
    "seen",
)
CODES = {
    "protocol",
    "bad_input",
    "bad_scope",
    "limit",
    "unknown_session",
    "not_authorised",
    "not_owner",
    "conflict",
    "deadlock",
    "timeout",
}
PATHOLOGICAL = [
    "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b",
    "**/**/**/**/**/**/**/**/**/x",
    "[",
    "[]",
    "[!]",
    "src/[z-a].py",
    "../etc/passwd",
    "/etc/passwd",
    "a/./b",
    "",
    "@",
    "@@",
    "a\x00b",
    "é/ü/𝄞",
    "a" * 2000,
    "/".join(["s"] * 100),
    "{a,b}",
    "a\\",
]


class Target:
    """A broker with one session holding a claim and a fact, and a raw peer."""

    def __init__(self, broker: BrokerProcess) -> None:
        self.broker = broker
        self.raw = Raw(broker.url)
        hello = self.raw.request("hello", repo=REPO, sid="s1", name="s1")
        assert hello["ok"], hello
        claim = self.raw.request("claim", sid="s1", scopes=["src/a.py"], ttl_ms=9e7)
        assert claim["ok"], claim
        self.grant = claim["grant"]
        fact = self.raw.request("publish", sid="s1", topics=["src/"], body="kept")
        assert fact["ok"], fact

    def state(self) -> dict[str, Any]:
        """Everything a refused request must leave alone."""
        snap = self.raw.request("snapshot", repo=REPO)
        for session in snap["sessions"]:
            session.pop("last_seen", None)
        facts = self.raw.request("facts", repo=REPO, include_history=True)
        status = self.raw.request("status")
        return {
            "snapshot": {k: snap[k] for k in ("seq", "head", "claims", "sessions")},
            "facts": facts["facts"],
            "repos": {r: v["seq"] for r, v in status["repos"].items()},
        }

    def send(self, *frames: bytes) -> dict[str, Any] | None:
        """Send frames, return the reply (None if the broker gave none)."""
        self.raw.send_raw(*frames)
        return self.raw.recv(2.0)

    def alive(self) -> None:
        """The broker process runs and answers."""
        assert self.broker.proc is not None
        assert self.broker.proc.poll() is None
        assert self.raw.request("ping")["ok"]


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    """One broker for the whole module; the hostile tests only read its state."""
    import shutil
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp(prefix="fb-h-"))
    broker = BrokerProcess(path, lease_ms=600_000).start()
    target = Target(broker)
    yield target
    target.raw.close()
    broker.kill()
    shutil.rmtree(path, ignore_errors=True)


def refused(
    target: Target, reply: dict[str, Any] | None, code: str | None = None
) -> None:
    """The reply is a specific refusal and the broker is still up."""
    assert reply is not None, "no reply"
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] in CODES, reply
    if code is not None:
        assert reply["error"]["code"] == code, reply
    target.alive()


_RIDS = itertools.count()


def body(**fields: Any) -> bytes:
    """A request body with a fresh rid (a repeated one would get a stored reply)."""
    return orjson.dumps({"rid": f"h{next(_RIDS)}", **fields})


CASES: list[tuple[str, list[bytes], str]] = [
    ("not json", [b"\xff\xfe not json"], "protocol"),
    ("empty frame", [b""], "protocol"),
    ("json array", [b"[1, 2, 3]"], "protocol"),
    ("json string", [b'"hello"'], "protocol"),
    ("no rid", [b'{"op": "ping"}'], "protocol"),
    ("numeric rid", [b'{"op": "ping", "rid": 5}'], "protocol"),
    ("long rid", [body(op="ping", rid="r" * 65)], "protocol"),
    ("two frames", [body(op="ping"), body(op="ping")], "protocol"),
    ("empty then body", [b"", body(op="ping")], "protocol"),
    ("unknown op", [body(op="format_disk")], "protocol"),
    ("op not a string", [body(op=["claim"])], "protocol"),
    ("invalid utf-8", [b'{"rid": "u", "op": "p\xffing"}'], "protocol"),
    ("lone surrogate", [b'{"rid": "u", "op": "\\ud800"}'], "protocol"),
    (
        "deep nesting",
        [b'{"rid": "u", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
        "protocol",
    ),
    ("over the size limit", [body(op="ping", pad="x" * 300_000)], "limit"),
    (
        "unknown session",
        [body(op="claim", sid="nobody", scopes=["a"])],
        "unknown_session",
    ),
    ("scopes not a list", [body(op="claim", sid="s1", scopes="src/")], "bad_input"),
    ("scope not a string", [body(op="claim", sid="s1", scopes=[1])], "bad_input"),
    ("escaping scope", [body(op="claim", sid="s1", scopes=["../x"])], "bad_scope"),
    ("absolute scope", [body(op="claim", sid="s1", scopes=["/etc"])], "bad_scope"),
    (
        "too many scopes",
        [body(op="claim", sid="s1", scopes=[f"m/{n}" for n in range(65)])],
        "limit",
    ),
    (
        "bad mode",
        [body(op="claim", sid="s1", scopes=["m/x"], mode="sole")],
        "bad_input",
    ),
    (
        "ttl a bool",
        [body(op="claim", sid="s1", scopes=["m/x"], ttl_ms=True)],
        "bad_input",
    ),
    (
        "negative ttl",
        [body(op="claim", sid="s1", scopes=["m/x"], ttl_ms=-1)],
        "bad_input",
    ),
    (
        "huge ttl",
        [body(op="claim", sid="s1", scopes=["m/x"], ttl_ms=1e300)],
        "bad_input",
    ),
    (
        "long intent",
        [body(op="claim", sid="s1", scopes=["m/x"], intent="i" * 5000)],
        "bad_input",
    ),
    ("sid an object", [body(op="heartbeat", sid={"a": 1})], "bad_input"),
    ("repo empty", [body(op="hello", sid="new", repo="")], "bad_input"),
    ("meta a list", [body(op="hello", sid="new", repo=REPO, meta=[1])], "bad_input"),
    ("ids not strings", [body(op="release", sid="s1", ids=[1, 2])], "bad_input"),
    ("two selectors", [body(op="release", sid="s1", all=True, ids=["x"])], "bad_input"),
    (
        "renew nothing",
        [body(op="renew", sid="s1", ids=["nope"], ttl_ms=1000)],
        "bad_input",
    ),
    (
        "fact too big",
        [body(op="publish", sid="s1", topics=["a"], body="x" * 5000)],
        "limit",
    ),
    ("fact no topics", [body(op="publish", sid="s1", body="x")], "bad_input"),
    (
        "fact bad kind",
        [body(op="publish", sid="s1", topics=["a"], body="x", kind="rumour")],
        "bad_input",
    ),
    (
        "too many topics",
        [body(op="publish", sid="s1", topics=[f"t{n}" for n in range(17)], body="x")],
        "limit",
    ),
    ("retract unknown", [body(op="retract", sid="s1", id="f999999")], "bad_input"),
    ("facts huge limit", [body(op="facts", repo=REPO, limit=10**9)], "bad_input"),
    ("seen too many", [body(op="seen", sid="s1", ids=["f1"] * 10_001)], "bad_input"),
    ("force without repo", [body(op="force_release", scopes=["src/"])], "bad_input"),
]


@pytest.mark.parametrize(
    ("frames", "code"), [(f, c) for _n, f, c in CASES], ids=[n for n, _f, _c in CASES]
)
def test_malformed_request_is_refused_and_changes_nothing(
    target: Target, frames: list[bytes], code: str
) -> None:
    """Each malformed request gets its specific error; the state stays as it was."""
    before = target.state()
    reply = target.send(*frames)
    refused(target, reply, code)
    assert target.state() == before


def test_message_beyond_the_transport_limit_drops_only_that_peer(
    target: Target,
) -> None:
    """A frame past the socket's size limit ends that connection, not the broker."""
    before = target.state()
    bully = Raw(target.broker.url)
    try:
        bully.send_raw(b"x" * (5 * 1024 * 1024))
        assert bully.recv(1.0) is None
    finally:
        bully.close()
    target.alive()
    assert target.state() == before


@pytest.mark.parametrize("scope", PATHOLOGICAL)
def test_pathological_scopes_answer_quickly(target: Target, scope: str) -> None:
    """Claims and queries on pathological globs are answered within a second."""
    started = time.monotonic()
    claim = target.raw.request("claim", sid="s1", scopes=[scope, "src/**"])
    facts = target.raw.request("facts", repo=REPO, scopes=[scope])
    assert time.monotonic() - started < 1.0
    for reply in (claim, facts):
        assert reply["ok"] or reply["error"]["code"] in CODES, reply
    if claim["ok"]:
        released = target.raw.request("release", sid="s1", grant=claim["grant"])
        assert released["ok"], released


# -- property-based ------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
    | st.sampled_from(PATHOLOGICAL)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=20,
)
FIELDS = (
    "sid",
    "repo",
    "scopes",
    "mode",
    "intent",
    "ttl_ms",
    "wait_ms",
    "grant",
    "ids",
    "all",
    "topics",
    "body",
    "kind",
    "id",
    "limit",
    "since",
    "changed_since",
    "search",
    "supersedes",
    "meta",
    "lease",
    "mark",
    "by",
    "wait",
)
requests = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS) | st.text(max_size=12), "rid": st.text(max_size=70)},
    optional={
        name: json_values
        | st.sampled_from(["s1", REPO, "src/a.py", ["src/"], ["src/a.py", "@x"]])
        for name in FIELDS
    },
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(message=requests)
def test_random_requests_never_break_the_broker(
    target: Target, message: dict[str, Any]
) -> None:
    """Any request gets a reply; a refusal is specific and changes nothing."""
    if message.get("op") in ("leave", "hello") and message.get("sid") == "s1":
        message["sid"] = "s2"
    before = target.state()
    reply = target.send(orjson.dumps(message))
    target.alive()
    if reply is None:
        return
    if reply.get("ok"):
        return
    assert reply["error"]["code"] in CODES, (message, reply)
    assert target.state() == before, message


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=4))
def test_random_frames_never_break_the_broker(
    target: Target, frames: list[bytes]
) -> None:
    """Arbitrary bytes in any number of frames: a protocol error at most."""
    before = target.state()
    reply = target.send(*frames)
    target.alive()
    if reply is not None and not reply.get("ok"):
        assert reply["error"]["code"] in CODES, (frames, reply)
        assert target.state() == before


# -- rates and fairness --------------------------------------------------------


@pytest.fixture
def limited(
    broker_factory: Callable[..., BrokerProcess],
) -> BrokerProcess:
    """A broker allowing each peer 200 requests a second in bursts of 100."""
    return broker_factory(
        "limited", extra_args=["--rate-per-s", "200", "--rate-burst", "100"]
    )


def test_a_flooding_peer_is_limited_and_others_are_not(limited: BrokerProcess) -> None:
    """Past its burst a peer gets ``limit``/``rate``; a quiet peer is unaffected."""
    flood = Raw(limited.url)
    quiet = Raw(limited.url)
    try:
        for n in range(1000):
            flood.send_raw(body(op="ping", rid=f"f{n}"))
        codes: dict[str, int] = {}
        for _ in range(1000):
            reply = flood.recv(5)
            assert reply is not None
            key = "ok" if reply["ok"] else reply["error"]["limit"]
            codes[key] = codes.get(key, 0) + 1
        assert codes["rate"] > 0, codes
        assert 100 <= codes["ok"] < 1000, codes
        for n in range(20):
            assert quiet.request("ping", rid=f"q{n}")["ok"]
    finally:
        flood.close()
        quiet.close()


def test_sessions_sharing_a_connection_get_a_bucket_each(
    limited: BrokerProcess,
) -> None:
    """The SDK sends a process's sessions over one socket: each has its own
    bucket there, and one flooding session is still limited alone."""
    raw = Raw(limited.url)
    try:
        for sid in ("s1", "s2"):
            assert raw.request("hello", repo="r", sid=sid, rid=f"h-{sid}")["ok"]
        # A burst each: two bursts' worth in all, more than one bucket holds.
        for _ in range(90):
            for sid in ("s1", "s2"):
                raw.send_raw(body(op="heartbeat", sid=sid))
        codes: dict[str, int] = {}
        for _ in range(180):
            reply = raw.recv(5)
            assert reply is not None
            key = "ok" if reply["ok"] else reply["error"]["limit"]
            codes[key] = codes.get(key, 0) + 1
        assert codes == {"ok": 180}
        for _ in range(1000):
            raw.send_raw(body(op="heartbeat", sid="s1"))
        limited_s1 = 0
        for _ in range(1000):
            reply = raw.recv(5)
            assert reply is not None
            limited_s1 += not reply["ok"]
        assert limited_s1 > 0
    finally:
        raw.close()


def test_a_flood_does_not_starve_other_sessions(broker: BrokerProcess) -> None:
    """While one peer floods the broker, another's requests still come back fast."""
    stop = threading.Event()

    def flood() -> None:
        raw = Raw(broker.url)
        try:
            n = 0
            while not stop.is_set():
                for _ in range(500):
                    raw.send_raw(body(op="status", rid=f"f{n}"))
                    n += 1
                while raw.recv(0.0) is not None:
                    pass
        finally:
            raw.close()

    flooder = threading.Thread(target=flood)
    flooder.start()
    quiet = Raw(broker.url)
    try:
        time.sleep(0.2)
        worst = 0.0
        for n in range(50):
            started = time.monotonic()
            assert quiet.request("ping", rid=f"q{n}")["ok"]
            worst = max(worst, time.monotonic() - started)
    finally:
        stop.set()
        flooder.join()
        quiet.close()
    assert worst < 0.5, worst
