"""``fleetbus status``: sessions, claims with waiters, and facts; text and JSON."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import orjson

from fleetbus.client import connect
from fleetbus.errors import TimedOut
from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")


def status(broker: BrokerProcess, cwd: Path, *args: str) -> str:
    done = subprocess.run(
        [FLEETBUS, "status", "--url", broker.url, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_tables_show_sessions_claims_waiters_and_facts(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """A held claim with one waiter behind it, and a fact, as readable tables."""
    with (
        connect(broker.url, repo=short_tmp, name="alice") as alice,
        connect(broker.url, repo=short_tmp, name="bob") as bob,
    ):
        alice.claim("src/auth/", "docs/a.md", intent="rework login")
        queued = threading.Event()
        bob.on_event(lambda e: queued.set() if e["type"] == "wait.queued" else None)
        waiter = threading.Thread(
            target=_wait_quietly, args=(bob, "src/auth/x.py"), daemon=True
        )
        waiter.start()
        assert queued.wait(10)
        text = status(broker, short_tmp)
        alice.release(all=True)
        waiter.join(10)

    lines = text.splitlines()
    assert lines[0].startswith(f"broker {broker.url}")
    header = next(line for line in lines if line.startswith("SESSION"))
    assert header.split() == ["SESSION", "HOST", "BRANCH", "SINCE", "HEARD", "WORKTREE"]
    holder = next(line for line in lines if "rework" in line)
    assert holder.startswith("alice ")
    assert "src/auth/, docs/a.md" in holder
    assert holder.split()[-3:] == ["1", "rework", "login"]
    waiting = next(line for line in lines if "waiting" in line)
    assert waiting.startswith("bob ")


def _wait_quietly(session: object, scope: str) -> None:
    try:
        session.claim(scope, wait=30)  # type: ignore[attr-defined]
    except TimedOut:
        pass


def test_json_has_broker_and_repo_tables(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """``--json`` gives the broker's figures and each repository's rows."""
    with connect(broker.url, repo=short_tmp, name="alice") as alice:
        alice.claim("src/", intent="x")
        data = orjson.loads(status(broker, short_tmp, "--json"))

    assert data["broker"]["epoch"] == broker.epoch
    (repo,) = data["repos"].values()
    assert [s["name"] for s in repo["sessions"]] == ["alice"]
    assert [c["scope"] for c in repo["claims"]] == ["src/"]
    assert repo["waiters"] == []
    assert isinstance(repo["facts"], list)


def test_all_repos_lists_each_repository(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """``--all-repos`` covers repositories other than the current one."""
    other = short_tmp / "other"
    other.mkdir()
    with (
        connect(broker.url, repo=short_tmp, name="a"),
        connect(broker.url, repo=other, name="b"),
    ):
        data = orjson.loads(status(broker, short_tmp, "--all-repos", "--json"))

    assert len(data["repos"]) == 2


def test_broker_is_found_through_the_config_file(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """Without ``--url`` or ``$FLEETBUS_URL`` the file's ``url`` names the broker."""
    file = short_tmp / "c.toml"
    file.write_text(f'url = "{broker.url}"\n')
    env = {k: v for k, v in os.environ.items() if k != "FLEETBUS_URL"}

    done = subprocess.run(
        [FLEETBUS, "status", "--json", "--all-repos"],
        cwd=short_tmp,
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "FLEETBUS_CONFIG": str(file)},
    )

    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["broker"]["epoch"] == broker.epoch
