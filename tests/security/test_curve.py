"""CURVE on TCP: who is admitted, who may act as a session, what a repo may see."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from fleetbus.client import AsyncSession
from fleetbus.errors import BadInput, NotAuthorised
from fleetbus.repo import RepoInfo
from fleetbus.security import CLIENT_KEY_ENV, SERVER_KEY_ENV
from tests.security.conftest import CurveBroker, Keys

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")


def ok(reply: dict[str, Any] | None) -> dict[str, Any]:
    """The reply, checked to be a success."""
    assert reply is not None
    assert reply["ok"], reply
    return reply


def denied(reply: dict[str, Any] | None) -> None:
    """Check the reply is a ``not_authorised`` refusal."""
    assert reply is not None, "no reply"
    assert reply["ok"] is False
    assert reply["error"]["code"] == "not_authorised", reply


def test_admitted_keys_are_served(curve_broker: CurveBroker) -> None:
    """A key in the allow-list gets answers."""
    peer = curve_broker.peer("alice")
    try:
        ok(peer.request("ping"))
    finally:
        peer.close()


@pytest.mark.parametrize("name", ["mallory", None], ids=["unknown-key", "no-curve"])
def test_unknown_keys_and_plain_peers_are_refused(
    curve_broker: CurveBroker, name: str | None
) -> None:
    """A key not in the allow-list, or no CURVE at all, never gets an answer."""
    peer = curve_broker.peer(name)
    try:
        assert peer.request("ping", timeout=1.0) is None
    finally:
        peer.close()


def test_the_allow_list_is_reloaded_when_it_changes(
    curve_broker: CurveBroker, keys: Keys
) -> None:
    """A key added to the allow-list directory is admitted without a restart."""
    shutil.copy(keys.public("mallory"), keys.allow)
    deadline = time.monotonic() + 10
    reply = None
    while reply is None and time.monotonic() < deadline:
        peer = curve_broker.peer("mallory")
        try:
            reply = peer.request("ping", timeout=0.3)
        finally:
            peer.close()
    ok(reply)


def test_a_session_answers_only_to_the_key_that_opened_it(
    curve_broker: CurveBroker,
) -> None:
    """Another admitted key cannot act as the session; its own key always can."""
    alice = curve_broker.peer("alice")
    bob = curve_broker.peer("bob")
    again = curve_broker.peer("alice")
    try:
        ok(alice.request("hello", repo="r", sid="s-alice"))
        grant = ok(alice.request("claim", sid="s-alice", scopes=["a.py"]))
        fact = ok(alice.request("publish", sid="s-alice", topics=["a.py"], body="x"))
        for op, fields in [
            ("hello", {"repo": "r"}),
            ("heartbeat", {}),
            ("claim", {"scopes": ["b.py"]}),
            ("release", {"grant": grant["grant"]}),
            ("renew", {"grant": grant["grant"], "ttl_ms": 1000}),
            ("publish", {"topics": ["a.py"], "body": "y"}),
            ("retract", {"id": fact["fact"]["id"]}),
            ("unseen", {}),
            ("leave", {}),
        ]:
            denied(bob.request(op, sid="s-alice", **fields))
        released = ok(again.request("release", sid="s-alice", grant=grant["grant"]))
        assert released["released"] == [grant["claims"][0]["id"]]
    finally:
        for peer in (alice, bob, again):
            peer.close()


def test_repositories_are_isolated_between_keys(curve_broker: CurveBroker) -> None:
    """A key sees and touches only the repositories where it holds a session."""
    alice = curve_broker.peer("alice")
    bob = curve_broker.peer("bob")
    try:
        ok(alice.request("hello", repo="repo-a", sid="a1"))
        grant = ok(alice.request("claim", sid="a1", scopes=["x.py"]))
        fact = ok(alice.request("publish", sid="a1", topics=["x.py"], body="secret"))
        ok(bob.request("hello", repo="repo-b", sid="b1"))
        before = ok(alice.request("snapshot", repo="repo-a"))
        denied(bob.request("snapshot", repo="repo-a"))
        denied(bob.request("facts", repo="repo-a"))
        denied(bob.request("facts", repo="repo-a", sid="b1"))
        denied(bob.request("snapshot", repo="repo-a", sid="b1"))
        status = ok(bob.request("status"))
        assert set(status["repos"]) == {"repo-b"}
        row_id = grant["claims"][0]["id"]
        assert ok(bob.request("release", sid="b1", ids=[row_id]))["released"] == []
        assert not bob.request("renew", sid="b1", ids=[row_id], ttl_ms=9)["ok"]  # type: ignore[index]
        assert not bob.request("retract", sid="b1", id=fact["fact"]["id"])["ok"]  # type: ignore[index]
        assert (
            ok(bob.request("seen", sid="b1", ids=[fact["fact"]["id"]]))["marked"] == []
        )
        ok(bob.request("facts", repo="repo-b"))
        after = ok(alice.request("snapshot", repo="repo-a"))
        assert after["claims"] == before["claims"]
        assert after["seq"] == before["seq"]
    finally:
        alice.close()
        bob.close()


def test_force_release_is_for_operators_and_is_published(
    curve_broker: CurveBroker,
) -> None:
    """Only an operator key may force a release; it is logged with its author."""
    alice = curve_broker.peer("alice")
    bob = curve_broker.peer("bob")
    op = curve_broker.peer("op")
    try:
        ok(alice.request("hello", repo="r", sid="held"))
        grant = ok(alice.request("claim", sid="held", scopes=["stuck.py"]))
        ok(bob.request("hello", repo="r", sid="bob"))
        denied(bob.request("force_release", repo="r", scopes=["stuck.py"]))
        denied(bob.request("force_release", repo="r", sid="bob", ids=["x"]))
        forced = ok(
            op.request("force_release", repo="r", scopes=["stuck.py"], by="ops-oncall")
        )
        assert forced["released"] == [grant["claims"][0]["id"]]
        assert ok(alice.request("snapshot", repo="r"))["claims"] == []
    finally:
        for peer in (alice, bob, op):
            peer.close()
    log = curve_broker.log()
    assert '"event":"claim.force_released"' in log
    assert '"by":"ops-oncall"' in log


def test_an_operator_frees_a_session_id_for_a_new_key(
    curve_broker: CurveBroker, keys: Keys
) -> None:
    """A client whose key was replaced is refused as its old session id until
    an operator unbinds it; the next key to open it then owns it, claims and
    all, and keeps it across a restart."""
    old, new, op = (curve_broker.peer(n) for n in ("alice", "bob", "op"))
    try:
        ok(old.request("hello", repo="r", sid="cli-alice@host"))
        grant = ok(old.request("claim", sid="cli-alice@host", scopes=["a.py"]))
        refused = new.request("hello", repo="r", sid="cli-alice@host")
        denied(refused)
        assert "fleetbus unbind cli-alice@host" in refused["error"]["message"]  # type: ignore[index]
        denied(new.request("unbind", target="cli-alice@host"))
        nobody = op.request("unbind", target="never-opened")
        assert nobody is not None
        assert nobody["error"]["code"] == "bad_input", nobody

        freed = ok(op.request("unbind", target="cli-alice@host", by="oncall"))
        assert freed["unbound"] == "cli-alice@host"
        assert freed["live"] is True
        ok(new.request("hello", repo="r", sid="cli-alice@host"))
        denied(old.request("heartbeat", sid="cli-alice@host"))
        released = ok(
            new.request("release", sid="cli-alice@host", grant=grant["grant"])
        )
        assert released["released"] == [grant["claims"][0]["id"]]
    finally:
        for peer in (old, new, op):
            peer.close()
    log = curve_broker.log()
    assert '"event":"session.unbound"' in log
    assert '"by":"oncall"' in log

    curve_broker.kill()
    again = CurveBroker(curve_broker.workdir, keys)
    old, new = again.peer("alice"), again.peer("bob")
    try:
        ok(new.request("hello", repo="r", sid="cli-alice@host"))
        denied(old.request("hello", repo="r", sid="cli-alice@host"))
    finally:
        old.close()
        new.close()
        again.kill()


def test_unbind_from_the_cli_needs_an_operator_key(
    curve_broker: CurveBroker, keys: Keys
) -> None:
    """``fleetbus unbind SID`` over CURVE: an operator's key frees the id, any
    other admitted key is refused with exit code 1."""
    alice = curve_broker.peer("alice")
    try:
        ok(alice.request("hello", repo="r", sid="old-id"))
        ok(alice.request("leave", sid="old-id"))
    finally:
        alice.close()

    def unbind(name: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            SERVER_KEY_ENV: str(keys.public("broker")),
            CLIENT_KEY_ENV: str(keys.secret(name)),
        }
        return subprocess.run(
            [FLEETBUS, "unbind", "old-id", "--url", curve_broker.url, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    refused = unbind("bob")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "operators" in refused.stdout + refused.stderr
    done = unbind("op")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"unbound": "old-id", "live": False}
    bob = curve_broker.peer("bob")
    try:
        ok(bob.request("hello", repo="r", sid="old-id"))
    finally:
        bob.close()


async def test_the_sdk_speaks_curve_with_pinned_keys(
    curve_broker: CurveBroker,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A session given the broker's key and its own claims, and its replica follows."""
    monkeypatch.setenv(SERVER_KEY_ENV, str(keys.public("broker")))
    monkeypatch.setenv(CLIENT_KEY_ENV, str(keys.secret("bob")))
    repo = RepoInfo(id="sdk-repo", root=tmp_path, branch=None)
    session = await AsyncSession.connect(curve_broker.url, repo=repo, timeout=5)
    try:
        grant = await session.claim("src/a.py")
        await session.wait_synced()
        assert [row.id for row in session.claims()] == [g.id for g in grant.claims]
    finally:
        await session.close()


async def test_the_sdk_unbinds_for_an_operator_only(
    curve_broker: CurveBroker,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """``AsyncSession.unbind`` frees a live session's id with an operator key
    and raises NotAuthorised with any other."""
    alice = curve_broker.peer("alice")
    try:
        ok(alice.request("hello", repo="sdk-repo", sid="alice-1"))
    finally:
        alice.close()
    monkeypatch.setenv(SERVER_KEY_ENV, str(keys.public("broker")))
    repo = RepoInfo(id="sdk-repo", root=tmp_path, branch=None)
    for name, sid in (("bob", "bob-1"), ("op", "op-1")):
        monkeypatch.setenv(CLIENT_KEY_ENV, str(keys.secret(name)))
        session = await AsyncSession.connect(
            curve_broker.url, repo=repo, session_id=sid, timeout=5
        )
        try:
            if name == "bob":
                with pytest.raises(NotAuthorised, match="operators"):
                    await session.unbind("alice-1")
            else:
                assert await session.unbind("alice-1") is True
        finally:
            await session.close()
    assert '"event":"session.unbound"' in curve_broker.log()
    assert '"by":"op-1"' in curve_broker.log()


async def test_the_sdk_needs_its_own_key_when_pinning(
    curve_broker: CurveBroker,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """Pinning the broker's key without a client key is a clear error."""
    monkeypatch.setenv(SERVER_KEY_ENV, str(keys.public("broker")))
    monkeypatch.delenv(CLIENT_KEY_ENV, raising=False)
    repo = RepoInfo(id="sdk-repo", root=tmp_path, branch=None)
    with pytest.raises(BadInput, match=CLIENT_KEY_ENV):
        await AsyncSession.connect(curve_broker.url, repo=repo, timeout=1)


def test_more_connections_with_one_key_share_its_rate(
    keys: Keys, short_tmp: Path
) -> None:
    """Under CURVE a peer's bucket is its key's: a second connection with the
    same key finds the bucket the first emptied (a bucket of its own would
    take all five of its requests); another key is unaffected."""
    broker = CurveBroker(short_tmp, keys, "--rate-per-s", "1", "--rate-burst", "5")
    first, second, other = (broker.peer(n) for n in ("bob", "bob", "op"))

    def codes(peer: Any, count: int) -> list[str]:
        out = []
        for _ in range(count):
            reply = peer.request("status")
            assert reply is not None
            out.append("ok" if reply["ok"] else reply["error"]["limit"])
        return out

    try:
        emptied = codes(first, 8)
        after = codes(second, 5)
        elsewhere = codes(other, 5)
    finally:
        for peer in (first, second, other):
            peer.close()
        broker.kill()

    assert "rate" in emptied, emptied
    assert "rate" in after, after
    assert elsewhere == ["ok"] * 5
