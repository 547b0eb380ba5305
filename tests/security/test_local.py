"""The local default: private files and sockets, one user, operators, isolation."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from fleetbus import paths
from fleetbus.client import connect
from fleetbus.errors import NotAuthorised
from fleetbus.security import create_keys, load_public, load_secret
from tests.faults.harness import Raw
from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")


def mode(path: Path) -> int:
    """The permission bits of ``path`` (not following links)."""
    return stat.S_IMODE(path.lstat().st_mode)


def test_sockets_and_store_are_private_to_the_user(broker: BrokerProcess) -> None:
    """Socket files, their directory, the data directory and every store file."""
    raw = Raw(broker.url)
    try:
        assert raw.request("hello", repo="r", sid="s")["ok"]
        assert raw.request("claim", sid="s", scopes=["a.py"])["ok"]
    finally:
        raw.close()
    sock = Path(broker.url.removeprefix("ipc://"))
    for path in (sock, Path(f"{sock}.pub")):
        assert stat.S_ISSOCK(path.lstat().st_mode)
        assert mode(path) & 0o077 == 0, oct(mode(path))
    assert mode(broker.data_dir) == 0o700
    files = list(broker.data_dir.glob("fleetbus.db*"))
    assert {p.name for p in files} >= {"fleetbus.db", "fleetbus.db-wal"}
    for path in files:
        assert mode(path) == 0o600, (path, oct(mode(path)))


def test_the_default_socket_directory_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runtime directory of the default socket is the user's alone."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    (tmp_path / "fleetbus").mkdir(mode=0o755)
    assert mode(paths.runtime_dir()) == 0o700


def test_key_pairs_are_written_privately(tmp_path: Path) -> None:
    """The secret key is readable by its owner only; names never clobber."""
    public, secret = create_keys(tmp_path / "keys", "alice")
    assert mode(tmp_path / "keys") == 0o700
    assert mode(secret) == 0o600
    assert load_public(public) == load_secret(secret)[0]
    with pytest.raises(Exception, match="already exists"):
        create_keys(tmp_path / "keys", "alice")


def test_keys_command_creates_pairs(tmp_path: Path) -> None:
    """``fleetbus keys`` writes one pair per name and says how to use them."""
    done = subprocess.run(
        [FLEETBUS, "keys", "broker", "laptop", "--dir", str(tmp_path / "k")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in (tmp_path / "k").iterdir())
    assert names == [
        "broker.key",
        "broker.key_secret",
        "laptop.key",
        "laptop.key_secret",
    ]
    assert "FLEETBUS_SERVER_KEY" in done.stdout


def test_the_same_user_may_act_as_its_session_from_another_process(
    broker: BrokerProcess,
) -> None:
    """On the local default one user is one credential: a later command may act."""
    first = Raw(broker.url)
    later = Raw(broker.url)
    try:
        assert first.request("hello", repo="r", sid="agent")["ok"]
        grant = first.request("claim", sid="agent", scopes=["a.py"], ttl_ms=60_000)
        released = later.request("release", sid="agent", grant=grant["grant"])
        assert released["released"] == [grant["claims"][0]["id"]]
    finally:
        first.close()
        later.close()


def test_a_session_stays_in_its_repository(broker: BrokerProcess) -> None:
    """Requests naming a session cannot read or touch another repository."""
    raw = Raw(broker.url)
    try:
        assert raw.request("hello", repo="one", sid="s1")["ok"]
        assert raw.request("hello", repo="two", sid="s2")["ok"]
        grant = raw.request("claim", sid="s2", scopes=["x.py"])
        fact = raw.request("publish", sid="s2", topics=["x.py"], body="two's")
        for op, fields in [
            ("snapshot", {"repo": "two"}),
            ("facts", {"repo": "two"}),
            ("status", {"repo": "two"}),
        ]:
            reply = raw.request(op, sid="s1", **fields)
            assert reply["error"]["code"] == "not_authorised", (op, reply)
        row = grant["claims"][0]["id"]
        assert raw.request("release", sid="s1", ids=[row])["released"] == []
        assert not raw.request("retract", sid="s1", id=fact["fact"]["id"])["ok"]
        hello = raw.request("hello", repo="two", sid="s1")
        assert hello["error"]["code"] == "bad_input"
        snap = raw.request("snapshot", repo="two")
        assert [c["id"] for c in snap["claims"]] == [row]
    finally:
        raw.close()


def cli(
    broker: BrokerProcess, cwd: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """Run ``fleetbus ARGS --json`` against ``broker`` in ``cwd``."""
    env = {**os.environ, "FLEETBUS_URL": broker.url, "FLEETBUS_SESSION": "operator"}
    env.pop("CLAUDE_CODE_SESSION_ID", None)
    return subprocess.run(
        [FLEETBUS, *args, "--json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def stuck_claim(broker: BrokerProcess, repo: str) -> str:
    """A TTL claim of a session that went away; returns the row id."""
    raw = Raw(broker.url)
    try:
        assert raw.request("hello", repo=repo, sid="gone")["ok"]
        grant = raw.request("claim", sid="gone", scopes=["src/a.py"], ttl_ms=600_000)
        assert grant["ok"], grant
        return str(grant["claims"][0]["id"])
    finally:
        raw.close()


def test_force_release_from_the_cli_is_logged_and_published(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    """The local user, an operator by default, may force a release."""
    repo = f"path:{os.path.realpath(tmp_path)}"
    row = stuck_claim(broker, repo)
    done = cli(broker, tmp_path, "release", "--force", "src/a.py")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["released"] == [row]
    assert '"event":"claim.force_released"' in broker.log()
    assert '"reason":"forced"' in broker.log()


def test_unbind_on_the_local_default_says_there_is_nothing_to_free(
    broker: BrokerProcess, tmp_path: Path
) -> None:
    """Without CURVE every peer is the one local user and no session id is
    bound, so ``fleetbus unbind`` is bad input and says why."""
    stuck_claim(broker, f"path:{os.path.realpath(tmp_path)}")
    done = cli(broker, tmp_path, "unbind", "gone")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "without CURVE" in done.stdout + done.stderr


def test_force_release_can_be_withheld_from_the_local_user(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """With ``--no-local-operator`` nobody on the local socket may force."""
    broker = broker_factory("strict", extra_args=["--no-local-operator"])
    repo = f"path:{os.path.realpath(tmp_path)}"
    stuck_claim(broker, repo)
    done = cli(broker, tmp_path, "release", "--force", "src/a.py")
    assert done.returncode != 0
    assert "operators" in done.stdout + done.stderr


def test_the_sdk_force_release_is_refused_to_a_non_operator(
    broker_factory: Callable[..., BrokerProcess], tmp_path: Path
) -> None:
    """Without operator rights ``Session.force_release`` raises NotAuthorised."""
    broker = broker_factory("strict", extra_args=["--no-local-operator"])
    repo = f"path:{os.path.realpath(tmp_path)}"
    stuck_claim(broker, repo)
    with connect(broker.url, repo=tmp_path, session_id="not-an-operator") as session:
        with pytest.raises(NotAuthorised):
            session.force_release("src/a.py")
        assert [c.sid for c in session.claims()] == ["gone"]
