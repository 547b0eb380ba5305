"""``fleetbus doctor`` on a healthy set-up, a broken one and with no broker."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")


def doctor(
    url: str, repo: Path, *args: str, session: str | None = None
) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if k != "CLAUDE_CODE_SESSION_ID"}
    if session is not None:
        env["CLAUDE_CODE_SESSION_ID"] = session
    done = subprocess.run(
        [FLEETBUS, "doctor", "--url", url, "--repo", str(repo), "--json", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    return done.returncode, orjson.loads(done.stdout)


def by_name(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


def make_repo(path: Path, *, hooks: bool) -> Path:
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    if hooks:
        (path / ".claude").mkdir()
        (path / ".claude" / "settings.json").write_text(
            '{"hooks": {"PreToolUse": [{"hooks": [{"command": "fleetbus hook pre"}]}]}}'
        )
        guard = path / ".git" / "hooks" / "pre-commit"
        guard.write_text(
            "#!/bin/sh\n# fleetbus-guard\nexec fleetbus guard pre-commit\n"
        )
        guard.chmod(0o755)
    return path


def test_healthy_setup_exits_0(broker: BrokerProcess, short_tmp: Path) -> None:
    """Broker answers, clocks agree, directories private, hooks in place."""
    broker.workdir.chmod(0o700)
    repo = make_repo(short_tmp / "repo", hooks=True)

    code, report = doctor(broker.url, repo)

    checks = by_name(report)
    assert code == 0, report
    assert report["healthy"] is True
    for name in ("broker", "clock", "socket", "data", "disk", "hooks", "git guard"):
        assert checks[name] == "ok", (name, report)


def test_broken_setup_exits_1_and_says_what_is_wrong(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """Open socket and data directories fail; missing hooks are pointed out."""
    broker.workdir.chmod(0o755)
    broker.data_dir.chmod(0o755)
    repo = make_repo(short_tmp / "repo", hooks=False)

    code, report = doctor(broker.url, repo)

    checks = by_name(report)
    details = {c["name"]: c["detail"] for c in report["checks"]}
    assert code == 1
    assert checks["socket"] == "fail"
    assert f"chmod 700 {broker.workdir}" in details["socket"]
    assert checks["data"] == "fail"
    assert "chmod 700" in details["data"]
    assert checks["hooks"] == "warn"
    assert "fleetbus install" in details["hooks"]
    assert checks["git guard"] == "warn"


def test_release_on_push_without_its_hook_is_pointed_out(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """fleetbus.release=push with a guard installed before the hook that
    releases after a push: doctor warns and says how to add it."""
    broker.workdir.chmod(0o700)
    repo = make_repo(short_tmp / "repo", hooks=True)
    subprocess.run(["git", "config", "fleetbus.release", "push"], cwd=repo, check=True)

    code, before = doctor(broker.url, repo)
    after_push = repo / ".git" / "hooks" / "reference-transaction"
    after_push.write_text("#!/bin/sh\n# fleetbus-guard\nexit 0\n")
    after_push.chmod(0o755)
    _code, after = doctor(broker.url, repo)

    assert code == 0, before
    assert by_name(before)["git guard"] == "warn"
    detail = next(c["detail"] for c in before["checks"] if c["name"] == "git guard")
    assert "fleetbus install git" in detail
    assert by_name(after)["git guard"] == "ok"


def test_agent_session_without_a_sidecar_is_a_problem(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """Inside an agent's session whose sidecar is gone, doctor says where its log is."""
    broker.workdir.chmod(0o700)
    repo = make_repo(short_tmp / "repo", hooks=True)

    code, report = doctor(broker.url, repo, session="no-such-session")

    sidecar = next(c for c in report["checks"] if c["name"] == "sidecar")
    assert code == 1
    assert sidecar["status"] == "fail"
    assert "no-such-session has no live sidecar" in sidecar["detail"]


def test_unreachable_broker_exits_3(short_tmp: Path) -> None:
    """No broker at the URL: exit code 3, and the check says so."""
    code, report = doctor(f"ipc://{short_tmp}/absent.sock", short_tmp)

    assert code == 3
    assert by_name(report) == {"broker": "fail"}


def test_human_output_ends_with_a_verdict(broker: BrokerProcess) -> None:
    """Without ``--json``: one line per check, then the verdict."""
    done = subprocess.run(
        [FLEETBUS, "doctor", "--url", broker.url, "--broker-only"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    lines = done.stdout.strip().splitlines()
    assert done.returncode == 0
    assert lines[0].startswith("ok    broker")
    assert lines[-1] == "healthy"
