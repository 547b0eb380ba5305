"""``fleetbus doctor``: what is wrong with this set-up, in plain words.

Checks, in order: the broker answers (version, epoch); this machine's clock
agrees with the broker's; the broker's data directory and socket are private;
the agent hooks and the git guard are installed in this repository; and the
sidecar of the current agent session answers. Exit code 0 when healthy, 1
when a problem was found, 3 when the broker cannot be reached.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import orjson

from fleetbus import __version__
from fleetbus.errors import BrokerUnavailable, FleetbusError
from fleetbus.ops.link import Link, resolve_url
from fleetbus.repo import discover
from fleetbus.security import CLIENT_KEY_ENV, SERVER_KEY_ENV

Status = Literal["ok", "warn", "fail", "skip"]

CLOCK_WARN_S = 0.5
CLOCK_FAIL_S = 2.0
FREE_WARN_BYTES = 200 * 1024 * 1024
GUARD_MARK = "# fleetbus-guard"
HOOK_MARK = "fleetbus hook"
AGENT_SETTINGS = {
    "Claude Code": ".claude/settings.json",
    "Codex": ".codex/hooks.json",
    "Gemini CLI": ".gemini/settings.json",
}
_MARKS = {"ok": "ok  ", "warn": "warn", "fail": "FAIL", "skip": "-   "}


@dataclass(slots=True)
class Check:
    """One finding: what was checked, how it went, and what to do about it."""

    name: str
    status: Status
    detail: str


def check_broker(link: Link) -> tuple[list[Check], dict[str, Any] | None]:
    """Ping and status; the broker's figures when it answered."""
    try:
        before = time.time()
        ping = link.request("ping")
        after = time.time()
        status = link.request("status")
    except BrokerUnavailable as exc:
        return [Check("broker", "fail", exc.message + _curve_hint(link.url))], None
    except FleetbusError as exc:
        return [Check("broker", "fail", exc.message)], None
    checks = [
        Check(
            "broker",
            "ok",
            f"{link.url} answers: version {ping.get('version')}, "
            f"epoch {ping.get('epoch')}",
        )
    ]
    if ping.get("version") != __version__:
        checks.append(
            Check(
                "version",
                "warn",
                f"the broker runs {ping.get('version')}, this fleetbus is "
                f"{__version__}; upgrade the older one",
            )
        )
    checks.append(_clock(ping.get("time"), before, after))
    return checks, status


def _curve_hint(url: str) -> str:
    """Why a broker over TCP may be silent although it runs: CURVE keys."""
    if not url.startswith("tcp://"):
        return ""
    if os.environ.get(SERVER_KEY_ENV):
        return (
            f" If it runs, check that {SERVER_KEY_ENV} is its public key and that "
            f"the public key of {CLIENT_KEY_ENV} is in its curve_allow directory"
        )
    return (
        f" A broker with CURVE answers only clients that set {SERVER_KEY_ENV} "
        f"and {CLIENT_KEY_ENV}"
    )


def _clock(broker_time: Any, before: float, after: float) -> Check:
    if not isinstance(broker_time, int | float):
        return Check("clock", "skip", "the broker does not tell its time")
    offset = float(broker_time) - (before + after) / 2
    shown = f"{abs(offset):.3f}s {'ahead of' if offset > 0 else 'behind'} this machine"
    if abs(offset) >= CLOCK_FAIL_S:
        return Check(
            "clock",
            "fail",
            f"the broker's clock is {shown}: TTLs and ages will be wrong; "
            "run NTP on both",
        )
    if abs(offset) >= CLOCK_WARN_S + (after - before):
        return Check("clock", "warn", f"the broker's clock is {shown}")
    return Check("clock", "ok", f"within {CLOCK_WARN_S}s of the broker's")


def check_data_dir(path: Path) -> list[Check]:
    """The data directory exists, is private and has room."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return [Check("data", "fail", f"{path} does not exist")]
    except PermissionError:
        return [Check("data", "skip", f"{path} belongs to another user")]
    checks = [_private(path, info, "data")]
    free = shutil.disk_usage(path).free
    if free < FREE_WARN_BYTES:
        checks.append(
            Check("disk", "warn", f"only {free // 2**20} MiB free under {path}")
        )
    else:
        checks.append(Check("disk", "ok", f"{free // 2**20} MiB free under {path}"))
    return checks


def check_socket(url: str) -> list[Check]:
    """An ``ipc://`` socket's directory is reachable by its owner only."""
    if url.startswith("tcp://"):
        host = url[len("tcp://") :].rsplit(":", 1)[0]
        if os.environ.get(SERVER_KEY_ENV):
            return [Check("socket", "ok", f"{url} is encrypted with CURVE")]
        if host in ("127.0.0.1", "localhost", "[::1]"):
            return [Check("socket", "ok", f"{url} is on loopback")]
        return [
            Check(
                "socket",
                "warn",
                f"{url} is TCP without encryption: keep it on a trusted network",
            )
        ]
    if not url.startswith("ipc://"):
        return []
    path = Path(url[len("ipc://") :])
    try:
        directory = path.parent.stat()
    except OSError as exc:
        return [Check("socket", "fail", f"cannot inspect {path.parent}: {exc}")]
    return [_private(path.parent, directory, "socket")]


def _private(path: Path, info: os.stat_result, name: str) -> Check:
    mode = stat.S_IMODE(info.st_mode)
    if info.st_uid != os.getuid():
        return Check(name, "skip", f"{path} belongs to uid {info.st_uid}")
    if mode & 0o077:
        return Check(
            name,
            "fail",
            f"{path} has mode {mode:04o}: others can reach it; run chmod 700 {path}",
        )
    return Check(name, "ok", f"{path} is private ({mode:04o})")


def check_hooks(root: Path) -> list[Check]:
    """The agent hooks and the git guard in the repository at ``root``."""
    checks = []
    found = []
    for agent, relative in AGENT_SETTINGS.items():
        path = root / relative
        if path.is_file() and HOOK_MARK in path.read_text(errors="replace"):
            found.append(agent)
    if found:
        checks.append(Check("hooks", "ok", f"installed for {', '.join(found)}"))
    else:
        checks.append(
            Check(
                "hooks",
                "warn",
                "no agent runs fleetbus here; run: fleetbus install claude-code "
                "(or codex, gemini)",
            )
        )
    checks.append(_guard(root))
    return checks


def _guard(root: Path) -> Check:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--git-path", "hooks/pre-commit"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return Check("git guard", "skip", "git is not available")
    if done.returncode != 0:
        return Check("git guard", "skip", f"{root} is not a git repository")
    hook = root / done.stdout.strip()
    if not hook.is_file() or GUARD_MARK not in hook.read_text(errors="replace"):
        return Check(
            "git guard",
            "warn",
            "commits are not checked against claims; run: fleetbus install git",
        )
    if not os.access(hook, os.X_OK):
        return Check("git guard", "fail", f"{hook} is not executable; chmod +x it")
    from fleetbus.agents.gitguard import is_ours, release_mode

    if release_mode(root) == "push" and not is_ours(
        hook.with_name("reference-transaction")
    ):
        return Check(
            "git guard",
            "warn",
            "fleetbus.release is push but the hook that releases after a push is "
            "missing; run: fleetbus install git",
        )
    return Check("git guard", "ok", f"{hook} checks commits against claims")


def check_sidecar(environ: dict[str, str]) -> list[Check]:
    """The sidecar of the current Claude Code session, if there is one."""
    session = environ.get("CLAUDE_CODE_SESSION_ID")
    if not session:
        return []
    try:
        from fleetbus.agents.hookclient import answers, sidecar_file
    except ImportError:
        return [Check("sidecar", "skip", "agent support is not installed")]
    if answers(session):
        return [Check("sidecar", "ok", f"session {session} has a live sidecar")]
    log = sidecar_file(session, ".log")
    return [
        Check(
            "sidecar",
            "fail",
            f"session {session} has no live sidecar; the next hook starts one "
            f"(its log: {log})",
        )
    ]


def diagnose(args: argparse.Namespace) -> tuple[list[Check], int]:
    """Every check, and the exit code they add up to."""
    url = resolve_url(args.url)
    if url.startswith("ipc://") and not Path(url[len("ipc://") :]).exists():
        return [Check("broker", "fail", f"no broker socket at {url}: start one")], 3
    with Link(url, timeout=args.timeout) as link:
        checks, status = check_broker(link)
    if status is None:
        return checks, 3
    if not args.broker_only:
        checks.extend(check_socket(url))
        data = status.get("data_dir")
        if data and url.startswith("ipc://"):
            checks.extend(check_data_dir(Path(data)))
        root = discover(args.repo).root
        checks.extend(check_hooks(root))
        checks.extend(check_sidecar(dict(os.environ)))
    failed = any(check.status == "fail" for check in checks)
    return checks, 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    """Run the checks and print them; returns 0, 1 or 3."""
    checks, code = diagnose(args)
    if args.json:
        body = {"healthy": code == 0, "checks": [asdict(c) for c in checks]}
        sys.stdout.write(orjson.dumps(body).decode() + "\n")
        sys.stdout.flush()
        return code
    for check in checks:
        sys.stdout.write(f"{_MARKS[check.status]}  {check.name:<10} {check.detail}\n")
    verdict = {0: "healthy", 1: "problems found", 3: "broker unreachable"}[code]
    sys.stdout.write(f"\n{verdict}\n")
    sys.stdout.flush()
    return code
