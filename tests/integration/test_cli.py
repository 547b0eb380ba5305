"""The ``fleetbus`` claim commands as real subprocesses against a real broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from fleetbus.client import connect
from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run(broker: BrokerProcess, tmp_path: Path) -> Run:
    root = tmp_path / "work"
    (root / "src").mkdir(parents=True)

    def go(*args: str, session: str = "alice") -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "FLEETBUS_URL": broker.url, "FLEETBUS_SESSION": session}
        env.pop("CLAUDE_CODE_SESSION_ID", None)
        return subprocess.run(
            [FLEETBUS, *args],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    return go


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("fleetbus")
    return lines[0]


def test_claim_then_conflict_then_release(run: Run) -> None:
    """Granted exits 0; another session's overlapping claim exits 1 naming alice."""
    granted = run("claim", "src", "--intent", "rework")
    refused = run("claim", "src/a.py", session="bob")
    released = run("release", "src/")

    assert granted.returncode == 0, granted.stderr
    assert "src/" in granted.stdout
    assert refused.returncode == 1
    assert "held by alice" in one_line_error(refused)
    assert released.returncode == 0
    assert run("claim", "src/a.py", session="bob").returncode == 0


def test_releasing_another_sessions_claim_exits_1(run: Run) -> None:
    """Bob naming alice's claim exits 1; alice naming part of it is told the whole."""
    assert run("claim", "src/", "--intent", "rework").returncode == 0

    refused = run("release", "src/a.py", session="bob")
    partial = run("release", "src/a.py")
    listed = orjson.loads(run("claims", "--json").stdout)

    assert refused.returncode == 1
    assert "held by alice" in one_line_error(refused)
    assert partial.returncode == 2
    assert "release src/" in one_line_error(partial)
    assert [row["scope"] for row in listed["claims"]] == ["src/"]


def test_claim_lives_one_hour_by_default(run: Run) -> None:
    """A claim from the shell carries a TTL of one hour unless --ttl says."""
    claim = orjson.loads(run("claim", "@db", "--json").stdout)

    (row,) = claim["claims"]
    assert row["expires"] - row["since"] == pytest.approx(3600.0)


def test_json_shapes(run: Run) -> None:
    """--json prints one object per command, with the documented keys."""
    claim = orjson.loads(run("claim", "@db", "--json", "--ttl", "60").stdout)
    listed = orjson.loads(run("claims", "--json").stdout)
    who = orjson.loads(run("who", "@db", "--json").stdout)
    refused = run("claim", "@db", "--json", session="bob")
    released = orjson.loads(run("release", "--all", "--json").stdout)

    assert set(claim) == {"grant", "fence", "claims"}
    assert claim["claims"][0]["expires"] is not None
    assert [row["scope"] for row in listed["claims"]] == ["@db"]
    assert [row["sid"] for row in who["holders"]] == ["alice"]
    assert orjson.loads(refused.stdout)["error"]["code"] == "conflict"
    assert released == {"released": [claim["claims"][0]["id"]]}


def test_bad_input_exits_2(run: Run) -> None:
    """A scope outside the repository, a missing --repo, usage errors: exit 2."""
    outside = run("claim", "/etc/passwd")
    usage = run("release")
    no_repo = run("claims", "--repo", "no/such/dir")
    no_ttl = run("claim", "@db", "--ttl", "0")

    assert outside.returncode == 2
    assert "outside the repository" in one_line_error(outside)
    assert usage.returncode == 2
    assert no_repo.returncode == 2
    assert "no such file or directory" in one_line_error(no_repo)
    assert no_ttl.returncode == 2
    assert "--ttl: must be more than 0 seconds" in no_ttl.stderr


def test_unreachable_broker_exits_3(tmp_path: Path) -> None:
    """No broker: exit 3 with one line, after the timeout."""
    done = subprocess.run(
        [FLEETBUS, "claims", "--timeout", "0.3", "--url", f"ipc://{tmp_path}/x"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert done.returncode == 3
    assert "no answer" in one_line_error(done)


def test_wait_timeout_exits_1(run: Run) -> None:
    """A wait that runs out is a refusal."""
    assert run("claim", "@lock").returncode == 0

    done = run("claim", "@lock", "--wait", "0.2", session="bob")

    assert done.returncode == 1
    one_line_error(done)


def test_ctrl_c_withdraws_a_waiting_claim(
    run: Run, broker: BrokerProcess, tmp_path: Path
) -> None:
    """SIGINT during --wait exits 130 and leaves nothing queued at the broker."""
    assert run("claim", "@lock").returncode == 0
    root = tmp_path / "work"
    env = {**os.environ, "FLEETBUS_URL": broker.url, "FLEETBUS_SESSION": "bob"}
    env.pop("CLAUDE_CODE_SESSION_ID", None)
    with connect(broker.url, repo=str(root), session_id="watch") as watch:
        events = watch.events()
        waiter = subprocess.Popen(
            [FLEETBUS, "claim", "@lock", "--wait", "60"],
            cwd=root,
            env=env,
            stderr=subprocess.PIPE,
        )
        try:
            queued = next(e for e in events if e["type"] == "wait.queued")
            waiter.send_signal(signal.SIGINT)
            code = waiter.wait(timeout=30)
            ended = next(e for e in events if e["type"] == "wait.ended")
        finally:
            waiter.kill()
            waiter.wait()
        snapshot = watch.snapshot()

    assert queued["sid"] == "bob"
    assert code == 130
    assert (ended["sid"], ended["reason"]) == ("bob", "cancelled")
    assert snapshot["waiters"] == []


def test_help_lists_exit_codes() -> None:
    """The epilog documents the exit codes."""
    done = subprocess.run(
        [FLEETBUS, "--help"], capture_output=True, text=True, check=True
    )

    assert "3  broker unreachable" in done.stdout


def test_tail_into_head_is_quiet(broker: BrokerProcess) -> None:
    """``tail | head -1`` ends without a word on stderr once head has gone."""
    env = {**os.environ, "FLEETBUS_URL": broker.url}
    tail = subprocess.Popen(
        [FLEETBUS, "tail", "--json", "--repo", str(Path.cwd())],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    head = subprocess.Popen(
        ["head", "-c", "1"], stdin=tail.stdout, stdout=subprocess.DEVNULL
    )
    assert tail.stdout is not None
    tail.stdout.close()
    try:
        for i in range(200):
            if tail.poll() is not None:
                break
            subprocess.run(
                [FLEETBUS, "claim", f"@t{i}", "--repo", str(Path.cwd())],
                env={**env, "FLEETBUS_SESSION": f"t{i}"},
                capture_output=True,
                check=False,
            )
        code = tail.wait(timeout=30)
    finally:
        tail.kill()
        tail.wait()
        head.wait()

    assert tail.stderr is not None
    assert tail.stderr.read() == b""
    assert code == 0
