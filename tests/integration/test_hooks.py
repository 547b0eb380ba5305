"""The hook commands as agents run them: a subprocess per event, real sidecars.

Each simulated agent is a long-lived child process whose pid the hooks get in
``FLEETBUS_AGENT_PID``; its sidecar ends with it. Every test has its own
runtime directory, so sidecars never meet across tests, and teardown ends and
reaps every agent and sidecar it started.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from fleetbus.agents import gitguard, hookclient
from fleetbus.repo import discover
from tests.support.brokerproc import BrokerProcess

DEADLINE_S = 15.0
HEAVY = (
    "zmq",
    "orjson",
    "structlog",
    "fleetbus.client",
    "fleetbus.cli",
    "asyncio",
    "argparse",
)
_CLEARED = (
    *hookclient.SESSION_ENVS,
    "FLEETBUS_AUTOCLAIM",
    "FLEETBUS_FAIL",
    "FLEETBUS_SESSION_ID",
    hookclient.AGENT_PID_ENV,
)
_PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Hooked:
    """What one hook run did: exit status, parsed stdout, stderr."""

    code: int
    answer: dict[str, Any] | None
    stderr: str
    seconds: float

    @property
    def decision(self) -> str | None:
        """The permissionDecision answered, if any."""
        specific = (self.answer or {}).get("hookSpecificOutput") or {}
        return specific.get("permissionDecision")

    @property
    def reason(self) -> str:
        """The permissionDecisionReason answered, or empty."""
        specific = (self.answer or {}).get("hookSpecificOutput") or {}
        return str(specific.get("permissionDecisionReason", ""))

    @property
    def context(self) -> str:
        """The additionalContext answered, or empty."""
        specific = (self.answer or {}).get("hookSpecificOutput") or {}
        return str(specific.get("additionalContext", ""))


@dataclass
class Agent:
    """A simulated agent: a child process and the session id it hooks under."""

    sid: str
    proc: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        """The agent process's id, which its hooks pass on."""
        return self.proc.pid


@dataclass
class Bench:
    """A git repository, a broker, and the agents and hooks of one test."""

    root: Path
    repo: Path
    run_dir: Path
    url: str
    agents: list[Agent] = field(default_factory=list)

    def env(self, agent: Agent | None = None, **extra: str) -> dict[str, str]:
        """A hook's environment: this bench's broker and runtime dir, no agent's."""
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(XDG_RUNTIME_DIR=str(self.run_dir), FLEETBUS_URL=self.url)
        if agent is not None:
            env[hookclient.AGENT_PID_ENV] = str(agent.pid)
        env.update(extra)
        return env

    def agent(self, sid: str) -> Agent:
        """Start a simulated agent process for session ``sid``."""
        proc = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            stdin=subprocess.DEVNULL,
        )
        agent = Agent(sid, proc)
        self.agents.append(agent)
        return agent

    def hook(
        self,
        name: str,
        event: dict[str, Any] | str,
        agent: Agent | None = None,
        *,
        command: list[str] | None = None,
        **extra: str,
    ) -> Hooked:
        """Run hook ``name`` on ``event`` as ``agent``'s agent would."""
        data = event if isinstance(event, str) else json.dumps(event)
        argv = command or [sys.executable, "-m", "fleetbus.agents.hooks", name]
        start = time.monotonic()
        done = subprocess.run(
            argv,
            input=data.encode(),
            capture_output=True,
            env=self.env(agent, **extra),
            cwd=self.repo,
            timeout=60,
            check=False,
        )
        seconds = time.monotonic() - start
        out = done.stdout.decode().strip()
        answer = json.loads(out) if out else None
        return Hooked(done.returncode, answer, done.stderr.decode(), seconds)

    def edit(self, agent: Agent, path: str, tool: str = "Edit", **extra: str) -> Hooked:
        """Claude Code's PreToolUse hook for an edit of ``path`` with ``tool``."""
        key = "notebook_path" if tool == "NotebookEdit" else "file_path"
        return self.hook(
            "claude-code",
            claude_event(agent.sid, str(self.repo), "PreToolUse", tool, {key: path}),
            agent,
            **extra,
        )

    def claims(self) -> list[dict[str, Any]]:
        """The broker's claim rows for the bench's repository."""
        rows: list[dict[str, Any]] = snapshot(self.url, discover(self.repo).id)[
            "claims"
        ]
        return rows

    def held_by(self, sid: str) -> list[str]:
        """The scopes session ``sid`` holds, sorted."""
        return sorted(row["scope"] for row in self.claims() if row["sid"] == sid)

    def sidecar_pid(self, agent: Agent) -> int | None:
        """The pid of ``agent``'s sidecar, from its lock file."""
        return hookclient.sidecar_pid(agent.sid)

    def call(self, agent: Agent, request: dict[str, Any]) -> dict[str, Any]:
        """One request to ``agent``'s sidecar."""
        return hookclient.call_sidecar(agent.sid, request)


def claude_event(
    sid: str,
    cwd: str,
    event: str,
    tool: str | None = None,
    tool_input: dict[str, Any] | None = None,
    **fields: Any,
) -> dict[str, Any]:
    """An event as Claude Code writes it on a hook's stdin."""
    data: dict[str, Any] = {
        "session_id": sid,
        "transcript_path": f"/tmp/{sid}.jsonl",
        "cwd": cwd,
        "hook_event_name": event,
        "permission_mode": "default",
    }
    if tool is not None:
        data.update(tool_name=tool, tool_input=tool_input or {}, tool_use_id="tu1")
    data.update(fields)
    return data


def snapshot(url: str, repo_id: str) -> dict[str, Any]:
    """The broker's claim table of ``repo_id``, asked directly over zmq."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(url)
        sock.send(orjson.dumps({"op": "snapshot", "rid": "t", "repo": repo_id}))
        assert sock.poll(10_000), "the broker did not answer a snapshot"
        reply: dict[str, Any] = orjson.loads(sock.recv())
    finally:
        sock.close(linger=0)
    return reply if reply.get("ok") else {"claims": [], "sessions": []}


def wait_until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` until it holds; fail after :data:`DEADLINE_S`."""
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.02)


def gone(pid: int) -> bool:
    """Whether ``pid`` has ended; reaps it when it is our child (subreaper)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        waited = 0
    if waited == pid:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state == b"Z"


def sidecar_pids(run_dir: Path) -> list[int]:
    """Pids written by the sidecars of a runtime directory."""
    pids = []
    for lock in (run_dir / "fleetbus").glob("sc-*.lock"):
        text = lock.read_text().strip()
        if text.isdigit():
            pids.append(int(text))
    return pids


@pytest.fixture
def bench(
    broker: BrokerProcess, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Bench]:
    """A git repo with one commit, a runtime dir, and a broker with 1 s leases."""
    # Sidecars detach from their hook; as a subreaper this process gets them
    # back when their hook exits, so teardown can reap them.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    repo = short_tmp / "repo"
    repo.mkdir()
    for args in (
        ["init", "-q", "-b", "main"],
        ["config", "user.email", "t@example.com"],
        ["config", "user.name", "t"],
    ):
        subprocess.run(["git", *args], cwd=repo, check=True)
    (repo / "a.py").write_text("a = 1\n")
    (repo / "b.py").write_text("b = 1\n")
    (repo / "src").mkdir()
    (repo / "src" / "c.py").write_text("c = 1\n")
    subprocess.run(["git", "add", "."], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=repo, check=True)
    run_dir = short_tmp / "run"
    run_dir.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))
    bench = Bench(short_tmp, repo, run_dir, broker.url)
    yield bench
    for agent in bench.agents:
        agent.proc.kill()
        agent.proc.wait()
    for pid in sidecar_pids(run_dir):
        deadline = time.monotonic() + DEADLINE_S
        while not gone(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda pid=pid: gone(pid), f"sidecar {pid} is reaped")


# -- Claude Code ----------------------------------------------------------------


def test_edit_claims_the_file_without_a_permission_decision(bench: Bench) -> None:
    """An edit of a free file claims it and answers no allow/deny at all."""
    a = bench.agent("sess-a")

    hooked = bench.edit(a, str(bench.repo / "a.py"))

    assert hooked.code == 0, hooked.stderr
    assert hooked.decision is None
    assert bench.held_by("sess-a") == ["a.py"]


def test_edit_of_a_held_file_is_denied_naming_the_holder(bench: Bench) -> None:
    """A second session is denied, told who holds the file, why, and what to do."""
    a, b = bench.agent("sess-aaaa1111"), bench.agent("sess-bbbb2222")
    bench.edit(a, str(bench.repo / "a.py"), tool="Write")

    hooked = bench.edit(b, str(bench.repo / "a.py"))

    assert hooked.code == 0
    assert hooked.decision == "deny"
    assert "claude-code@main#sess-aaa" in hooked.reason
    assert "editing with claude-code" in hooked.reason
    assert " UTC (" in hooked.reason
    assert "since" in hooked.reason
    assert "fleetbus claim --wait" in hooked.reason
    assert bench.held_by("sess-bbbb2222") == []


def test_relative_symlinked_and_notebook_paths_map_to_one_scope(
    bench: Bench,
) -> None:
    """Relative paths, a symlinked worktree and notebook_path all name a.py."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    link = bench.root / "link"
    link.symlink_to(bench.repo)

    assert bench.edit(a, "a.py").decision is None
    assert bench.edit(b, str(link / "a.py")).decision == "deny"
    assert bench.edit(b, str(bench.repo / "src" / ".." / "a.py")).decision == "deny"
    assert bench.edit(b, "a.py", tool="NotebookEdit").decision == "deny"
    assert bench.held_by("sess-a") == ["a.py"]


def test_paths_outside_the_repo_and_other_tools_get_no_answer(bench: Bench) -> None:
    """Outside the worktree, reads and unknown events: exit 0, empty output."""
    a = bench.agent("sess-a")
    repo = str(bench.repo)

    outside = bench.edit(a, str(bench.root / "elsewhere.py"))
    escape = bench.edit(a, "../elsewhere.py")
    read = bench.hook(
        "claude-code",
        claude_event("sess-a", repo, "PreToolUse", "Read", {"file_path": "a.py"}),
        a,
    )
    stop = bench.hook("claude-code", claude_event("sess-a", repo, "Stop"), a)
    post_edit = bench.hook(
        "claude-code",
        claude_event("sess-a", repo, "PostToolUse", "Edit", {"file_path": "a.py"}),
        a,
    )

    for hooked in (outside, escape, read, stop, post_edit):
        assert (hooked.code, hooked.answer, hooked.stderr) == (0, None, "")
    assert bench.held_by("sess-a") == []


@pytest.mark.parametrize(
    "stdin",
    ["", "not json", "[1, 2]", '{"hook_event_name": 3}', '{"session_id": "s"}'],
)
def test_malformed_input_is_a_one_line_non_blocking_error(
    bench: Bench, stdin: str
) -> None:
    """Malformed stdin: exit 1 (not 2), nothing on stdout, one line on stderr."""
    hooked = bench.hook("claude-code", stdin)

    assert hooked.code == 1
    assert hooked.answer is None
    assert len(hooked.stderr.strip().splitlines()) == 1
    assert "malformed" in hooked.stderr


def test_edit_tool_without_a_path_is_malformed(bench: Bench) -> None:
    """An Edit whose input lacks file_path is reported, not guessed at."""
    a = bench.agent("sess-a")
    event = claude_event("sess-a", str(bench.repo), "PreToolUse", "Edit", {})

    hooked = bench.hook("claude-code", event, a)

    assert hooked.code == 1
    assert "file_path" in hooked.stderr


def test_autoclaim_off_checks_without_claiming(bench: Bench) -> None:
    """With FLEETBUS_AUTOCLAIM=0 an edit claims nothing but still sees holders."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")

    first = bench.edit(b, str(bench.repo / "b.py"), FLEETBUS_AUTOCLAIM="0")
    bench.edit(a, str(bench.repo / "a.py"))
    second = bench.edit(b, str(bench.repo / "a.py"), FLEETBUS_AUTOCLAIM="0")

    assert first.decision is None
    assert second.decision == "deny"
    assert bench.held_by("sess-b") == []


def test_facts_on_a_file_are_shown_once(bench: Bench) -> None:
    """A fact on a file reaches another session's edit once, as additional context."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "a.py"))
    bench.call(
        a,
        {
            "op": "publish",
            "topics": ["b.py"],
            "text": "b.py is generated; edit gen.py instead",
            "kind": "gotcha",
        },
    )

    first = bench.edit(b, str(bench.repo / "b.py"))
    again = bench.edit(b, str(bench.repo / "b.py"))

    assert first.decision is None
    assert "[gotcha] b.py: b.py is generated" in first.context
    assert "claude-code@main#sess-a" in first.context
    assert again.answer is None


def test_agent_exit_frees_its_claims_and_ends_its_sidecar(bench: Bench) -> None:
    """SIGKILL of the agent: its sidecar leaves, so its claims go at once."""
    a = bench.agent("sess-a")
    bench.edit(a, str(bench.repo / "a.py"))
    sidecar = bench.sidecar_pid(a)
    assert sidecar is not None
    assert bench.held_by("sess-a") == ["a.py"]

    a.proc.kill()
    a.proc.wait()

    wait_until(lambda: bench.held_by("sess-a") == [], "the claims are released")
    wait_until(lambda: gone(sidecar), "the sidecar has exited")


def test_killed_sidecar_loses_its_claims_when_the_lease_runs_out(
    bench: Bench,
) -> None:
    """SIGKILL of the sidecar: the broker expires its lease within seconds."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "a.py"))
    sidecar = bench.sidecar_pid(a)
    assert sidecar is not None

    os.kill(sidecar, signal.SIGKILL)
    wait_until(lambda: gone(sidecar), "the sidecar is dead")

    wait_until(lambda: bench.held_by("sess-a") == [], "the lease has expired")
    assert bench.edit(b, str(bench.repo / "a.py")).decision is None


def test_hooks_racing_to_start_a_sidecar_end_with_one(bench: Bench) -> None:
    """Six hooks of one session started at once: one sidecar serves them all."""
    a = bench.agent("sess-race")
    event = claude_event(
        "sess-race", str(bench.repo), "PreToolUse", "Edit", {"file_path": "a.py"}
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fleetbus.agents.hooks", "claude-code"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=bench.env(a),
        )
        for _ in range(6)
    ]
    results = [
        proc.communicate(json.dumps(event).encode(), timeout=60) for proc in procs
    ]

    assert [proc.returncode for proc in procs] == [0] * 6, results
    sidecars = [
        pid
        for pid in _pids()
        if "fleetbus.agents.sidecar" in _cmdline(pid) and "sess-race" in _cmdline(pid)
    ]
    assert len(sidecars) == 1
    log = (bench.run_dir / "fleetbus").glob("sc-*.log")
    assert sum(text.count("sidecar.started") for text in map(_read, log)) == 1
    assert bench.held_by("sess-race") == ["a.py"]


def test_broker_down_fails_open_with_a_warning(bench: Bench) -> None:
    """No broker: the edit goes ahead and the user gets a one-line warning."""
    a = bench.agent("sess-a")
    dead = f"ipc://{bench.root}/nobody.sock"

    hooked = bench.edit(a, str(bench.repo / "a.py"), FLEETBUS_URL=dead)
    again = bench.edit(a, str(bench.repo / "a.py"), FLEETBUS_URL=dead)

    assert hooked.code == 0
    assert hooked.decision is None
    assert hooked.answer is not None
    warning = hooked.answer["systemMessage"]
    assert "fleetbus" in warning
    assert "\n" not in warning
    assert again.answer == hooked.answer
    assert again.seconds < hooked.seconds


def test_broker_down_fails_closed_when_configured(bench: Bench) -> None:
    """FLEETBUS_FAIL=closed: no broker means the edit is denied."""
    a = bench.agent("sess-a")
    dead = f"ipc://{bench.root}/nobody.sock"

    hooked = bench.edit(
        a, str(bench.repo / "a.py"), FLEETBUS_URL=dead, FLEETBUS_FAIL="closed"
    )

    assert hooked.decision == "deny"
    assert "FLEETBUS_FAIL=closed" in hooked.reason


def test_no_runtime_directory_fails_open_with_a_warning(bench: Bench) -> None:
    """A runtime dir that cannot be made: a one-line warning, or denial if closed."""
    a = bench.agent("sess-a")
    blocked = bench.root / "not-a-dir"
    blocked.write_text("")

    hooked = bench.edit(a, "a.py", XDG_RUNTIME_DIR=str(blocked))
    closed = bench.edit(a, "a.py", XDG_RUNTIME_DIR=str(blocked), FLEETBUS_FAIL="closed")

    assert (hooked.code, hooked.decision, hooked.stderr) == (0, None, "")
    assert hooked.answer is not None
    assert "sidecar cannot run" in hooked.answer["systemMessage"]
    assert "\n" not in hooked.answer["systemMessage"]
    assert closed.decision == "deny"


def test_session_start_summarises_the_fleet(bench: Bench) -> None:
    """SessionStart tells the model who else works here and on what."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "a.py"))

    hooked = bench.hook(
        "claude-code",
        claude_event("sess-b", str(bench.repo), "SessionStart", source="startup"),
        b,
    )

    assert hooked.code == 0
    assert hooked.answer is not None
    assert hooked.answer["hookSpecificOutput"]["hookEventName"] == "SessionStart"
    assert "claude-code@main#sess-a" in hooked.context
    assert "a.py (editing with claude-code)" in hooked.context
    assert len(hooked.context) <= 4000


def test_user_prompt_gets_new_facts_on_held_scopes(bench: Bench) -> None:
    """UserPromptSubmit adds facts published since on what the session holds."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "src" / "c.py"))
    bench.edit(b, str(bench.repo / "a.py"))
    prompt = claude_event("sess-a", str(bench.repo), "UserPromptSubmit", prompt="go")
    bench.call(
        b,
        {
            "op": "publish",
            "topics": ["src/"],
            "text": "src is frozen",
            "kind": "warning",
        },
    )

    first = bench.hook("claude-code", prompt, a)
    again = bench.hook("claude-code", prompt, a)

    assert "[warning] src/: src is frozen" in first.context
    assert again.answer is None


def test_session_end_releases_and_stops_the_sidecar(bench: Bench) -> None:
    """SessionEnd leaves the fleet before answering; the sidecar exits."""
    a = bench.agent("sess-a")
    bench.edit(a, str(bench.repo / "a.py"))
    sidecar = bench.sidecar_pid(a)
    assert sidecar is not None

    hooked = bench.hook(
        "claude-code",
        claude_event("sess-a", str(bench.repo), "SessionEnd", reason="exit"),
        a,
    )

    assert (hooked.code, hooked.answer) == (0, None)
    assert bench.held_by("sess-a") == []
    wait_until(lambda: gone(sidecar), "the sidecar has exited")


def test_session_end_without_a_sidecar_starts_none(bench: Bench) -> None:
    """SessionEnd of a session that never hooked does nothing and is fast."""
    a = bench.agent("sess-quiet")
    hooked = bench.hook(
        "claude-code",
        claude_event("sess-quiet", str(bench.repo), "SessionEnd", reason="exit"),
        a,
    )

    assert (hooked.code, hooked.answer) == (0, None)
    assert sidecar_pids(bench.run_dir) == []


def test_shell_changes_to_files_others_hold_are_reported(bench: Bench) -> None:
    """PostToolUse on Bash names the changed files another session holds."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "a.py"))
    command = {"command": "sed -i s/1/2/ a.py"}
    repo = str(bench.repo)

    pre = bench.hook(
        "claude-code", claude_event("sess-b", repo, "PreToolUse", "Bash", command), b
    )
    (bench.repo / "a.py").write_text("a = 2\n")
    (bench.repo / "b.py").write_text("b = 2\n")
    post = bench.hook(
        "claude-code", claude_event("sess-b", repo, "PostToolUse", "Bash", command), b
    )
    quiet = bench.hook(
        "claude-code", claude_event("sess-b", repo, "PostToolUse", "Bash", command), b
    )

    assert (pre.code, pre.answer) == (0, None)
    assert post.answer is not None
    assert post.answer["hookSpecificOutput"]["hookEventName"] == "PostToolUse"
    assert "a.py: held by claude-code@main#sess-a" in post.context
    assert "b.py" not in post.context
    assert quiet.answer is None


@pytest.mark.parametrize(
    ("command", "refused"),
    [
        ("git commit --no-verify -m wip", True),
        ("git add . && git commit -nm wip", True),
        ("git -C sub commit -a -n", True),
        ("git commit -m wip", False),
        ("git commit -m '-n is a flag'", False),
        ("echo --no-verify", False),
    ],
)
def test_commit_no_verify_is_refused_while_the_guard_is_installed(
    bench: Bench, command: str, refused: bool
) -> None:
    """``git commit --no-verify``/``-n`` is denied only where the guard is in place."""
    a = bench.agent("sess-a")
    event = claude_event(
        "sess-a", str(bench.repo), "PreToolUse", "Bash", {"command": command}
    )
    hook = bench.repo / ".git" / "hooks" / "pre-commit"

    unguarded = bench.hook("claude-code", event, a)
    hook.write_text("#!/bin/sh\n# fleetbus-guard\nexit 0\n")
    guarded = bench.hook("claude-code", event, a)

    assert unguarded.decision is None
    assert (guarded.decision == "deny") is refused
    if refused:
        assert "--no-verify" in guarded.reason


def test_hook_path_imports_no_heavy_module(bench: Bench) -> None:
    """``fleetbus hook``, as installed, loads no pyzmq, orjson, CLI or argparse."""
    a = bench.agent("sess-a")
    bench.edit(a, str(bench.repo / "a.py"))
    event = claude_event(
        "sess-a", str(bench.repo), "PreToolUse", "Edit", {"file_path": "a.py"}
    )

    hooked = bench.hook(
        "claude-code",
        event,
        a,
        command=[
            sys.executable,
            "-X",
            "importtime",
            str(Path(sys.executable).parent / "fleetbus"),
            "hook",
            "claude-code",
        ],
    )

    modules = {
        line.split("|")[-1].strip()
        for line in hooked.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "fleetbus.agents.hookclient" in modules
    heavy = {m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY)}
    assert heavy == set()
    assert hooked.code == 0


def test_sidecar_caches_the_hook_path_bytecode(bench: Bench, tmp_path: Path) -> None:
    """With bytecode writes off, the hook loads its modules compiled all the same.

    The agent's environment forbids writing bytecode and points the cache at an
    empty directory, so only the sidecar, which writes it when it starts, can
    have put ``hookclient``'s compiled code there.
    """
    prefix = tmp_path / "pycache"
    env = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(prefix)}
    a = bench.agent("sess-a")
    assert bench.edit(a, str(bench.repo / "a.py"), **env).code == 0
    event = claude_event(
        "sess-a", str(bench.repo), "PreToolUse", "Edit", {"file_path": "b.py"}
    )
    fleetbus = str(Path(sys.executable).parent / "fleetbus")

    hooked = bench.hook(
        "claude-code",
        event,
        a,
        command=[sys.executable, "-v", fleetbus, "hook", "claude-code"],
        **env,
    )

    loaded = {
        line.split("code object from ")[1].strip("'")
        for line in hooked.stderr.splitlines()
        if line.startswith("# code object from ")
    }
    ours = {path for path in loaded if f"{os.sep}fleetbus{os.sep}" in path}
    tag = sys.implementation.cache_tag
    assert f"hookclient.{tag}.pyc" in {Path(path).name for path in ours}, ours
    assert all(path.startswith(str(prefix)) for path in ours), ours
    assert hooked.decision is None
    assert hooked.code == 0


# -- Codex and Gemini CLI -------------------------------------------------------


PATCH = """*** Begin Patch
*** Update File: a.py
@@
-a = 1
+a = 2
*** Add File: src/new.py
+x = 1
*** End Patch
"""


def test_codex_apply_patch_claims_and_denies(bench: Bench) -> None:
    """Codex's apply_patch: the patch's files are claimed, or the call is denied."""
    a, b = bench.agent("codex-a"), bench.agent("codex-b")

    def patch(agent: Agent) -> Hooked:
        event = {
            "session_id": agent.sid,
            "turn_id": "t1",
            "cwd": str(bench.repo),
            "hook_event_name": "PreToolUse",
            "model": "gpt-5",
            "permission_mode": "default",
            "tool_name": "apply_patch",
            "tool_input": {"command": PATCH},
            "tool_use_id": "c1",
        }
        return bench.hook("codex", event, agent)

    first = patch(a)
    second = patch(b)

    assert (first.code, first.decision) == (0, None)
    assert bench.held_by("codex-a") == ["a.py", "src/new.py"]
    assert second.decision == "deny"
    assert "codex@main#codex-a" in second.reason


# An agent that, like Codex, runs its hooks and shell commands as children and
# tells them no session id: one JSON job per line in, its result per line out.
_AGENT_LOOP = """
import json, os, subprocess, sys
os.environ["FLEETBUS_AGENT_PID"] = str(os.getpid())
for line in sys.stdin:
    job = json.loads(line)
    done = subprocess.run(job[0], input=job[1], capture_output=True, text=True)
    print(json.dumps([done.returncode, done.stdout, done.stderr]), flush=True)
"""


def test_codex_commit_is_checked_as_its_session_found_by_ancestry(
    bench: Bench,
) -> None:
    """Codex's own commit of a file it claimed passes the guard; another's not."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _AGENT_LOOP],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=bench.repo,
        env=bench.env(),
    )
    bench.agents.append(Agent("codex-c", proc))
    assert proc.stdin is not None
    assert proc.stdout is not None

    def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
        proc.stdin.write(json.dumps([argv, stdin]) + "\n")
        proc.stdin.flush()
        code, out, err = json.loads(proc.stdout.readline())
        return code, out, err

    fleetbus = str(Path(sys.executable).parent / "fleetbus")
    gitguard.install(bench.repo, fleetbus)
    event = {
        "session_id": "codex-c",
        "cwd": str(bench.repo),
        "hook_event_name": "PreToolUse",
        "tool_name": "apply_patch",
        "tool_input": {"command": PATCH},
    }
    hooked = run(fleetbus, "hook", "codex", stdin=json.dumps(event))
    (bench.repo / "a.py").write_text("a = 2\n")
    claimed = run(fleetbus, "claim", "b.py")
    committed = run("git", "commit", "-qam", "codex edits a.py")
    (bench.repo / "a.py").write_text("a = 3\n")
    outsider = subprocess.run(
        ["git", "commit", "-qam", "someone else edits a.py"],
        cwd=bench.repo,
        env=bench.env(),
        capture_output=True,
        text=True,
        check=False,
    )

    assert hooked[0] == 0, hooked
    assert "with the session" in claimed[1], claimed
    assert committed[0] == 0, committed
    assert bench.held_by("codex-c") == ["a.py", "b.py", "src/new.py"]
    assert outsider.returncode == 1
    assert "codex@main#codex-c" in outsider.stderr


def test_gemini_before_tool_denies_with_its_own_shape(bench: Bench) -> None:
    """Gemini CLI: {} for a free file, {"decision": "deny", ...} for a held one."""
    a, b = bench.agent("gem-a"), bench.agent("gem-b")

    def write(agent: Agent, event: str = "BeforeTool") -> Hooked:
        data = {
            "session_id": "ignored-when-env-set",
            "transcript_path": "/tmp/t.json",
            "cwd": str(bench.repo),
            "hook_event_name": event,
            "timestamp": "2026-01-01T00:00:00Z",
            "tool_name": "write_file",
            "tool_input": {"file_path": str(bench.repo / "a.py"), "content": "x"},
        }
        return bench.hook("gemini", data, agent, GEMINI_SESSION_ID=agent.sid)

    first = write(a)
    second = write(b)
    after = write(a, "AfterTool")
    end = bench.hook(
        "gemini",
        {"hook_event_name": "SessionEnd", "cwd": str(bench.repo), "reason": "exit"},
        a,
        GEMINI_SESSION_ID=a.sid,
    )

    assert (first.code, first.answer) == (0, {})
    assert second.answer is not None
    assert second.answer["decision"] == "deny"
    assert "gemini@main#gem-a" in second.answer["reason"]
    assert after.answer == {}
    assert end.answer == {}
    assert bench.held_by("gem-a") == []


def test_gemini_facts_on_a_replaced_file_come_after_the_tool(bench: Bench) -> None:
    """Gemini CLI: BeforeTool on replace claims quietly; AfterTool shows the facts."""
    a, g = bench.agent("sess-a"), bench.agent("gem-g")
    bench.edit(a, str(bench.repo / "a.py"))
    bench.call(
        a,
        {"op": "publish", "topics": ["b.py"], "text": "b.py is generated"},
    )

    def replace(event: str) -> Hooked:
        data = {
            "session_id": g.sid,
            "cwd": str(bench.repo),
            "hook_event_name": event,
            "tool_name": "replace",
            "tool_input": {"file_path": "b.py", "old_string": "1", "new_string": "2"},
        }
        return bench.hook("gemini", data, g, GEMINI_SESSION_ID=g.sid)

    before = replace("BeforeTool")
    after = replace("AfterTool")
    again = replace("AfterTool")

    assert (before.code, before.answer) == (0, {})
    assert bench.held_by("gem-g") == ["b.py"]
    assert after.answer is not None
    assert after.answer["hookSpecificOutput"]["hookEventName"] == "AfterTool"
    assert "b.py is generated" in after.context
    assert again.answer == {}


# -- the CLI inside an agent session --------------------------------------------


def test_cli_in_an_agent_session_claims_through_its_sidecar(bench: Bench) -> None:
    """``fleetbus claim`` inside an agent session claims on that session's lease."""
    a = bench.agent("sess-a")
    bench.edit(a, str(bench.repo / "a.py"))
    fleetbus = Path(sys.executable).parent / "fleetbus"
    env = bench.env(a, CLAUDE_CODE_SESSION_ID="sess-a")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(fleetbus), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=bench.repo,
            timeout=60,
            check=False,
        )

    claimed = cli("claim", "b.py", "--intent", "split b")
    rows = [row for row in bench.claims() if row["scope"] == "b.py"]
    released = cli("release", "b.py")

    assert claimed.returncode == 0, claimed.stderr
    assert "(exclusive, with the session)" in claimed.stdout
    assert [(r["sid"], r["intent"], r["expires"]) for r in rows] == [
        ("sess-a", "split b", None)
    ]
    assert released.returncode == 0, released.stderr
    assert bench.held_by("sess-a") == ["a.py"]


def test_fleetbus_hook_entry_point_answers(bench: Bench) -> None:
    """``fleetbus hook claude-code`` is the same hook, through the CLI."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "a.py"))
    fleetbus = str(Path(sys.executable).parent / "fleetbus")
    event = claude_event(
        "sess-b", str(bench.repo), "PreToolUse", "Edit", {"file_path": "a.py"}
    )

    hooked = bench.hook(
        "claude-code", event, b, command=[fleetbus, "hook", "claude-code"]
    )

    assert hooked.decision == "deny", hooked.stderr


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _read(path: Path) -> str:
    return path.read_text(errors="replace")


# -- the short way: a running sidecar answers the hook's raw event ---------------

# What a hook answered by its sidecar may import beyond a bare interpreter.
FAST_IMPORTS = {
    "fleetbus",
    "fleetbus.entry",
    "fleetbus.agents",
    "fleetbus.agents.hookclient",
    "_socket",
    "_sha256",
    "_sha2",
}
NEVER_FAST = (
    "json",
    "re",
    "enum",
    "typing",
    "__future__",
    "fleetbus.agents.hooks",
    *HEAVY,
)
_AGE = re.compile(rb"\(\d+ (s|min) ago\)")


@dataclass
class Run:
    """One hook process: exit status, raw stdout, its own stderr, its imports."""

    code: int
    out: bytes
    err: str
    modules: set[str]

    @property
    def fast(self) -> bool:
        """Whether the sidecar answered the raw event (the full hook never ran)."""
        return "fleetbus.agents.hooks" not in self.modules


def imported(stderr: str) -> tuple[set[str], str]:
    """The modules ``-X importtime`` reported, and the rest of stderr."""
    modules, rest = set(), []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            modules.add(line.split("|")[-1].strip())
        else:
            rest.append(line)
    return modules, "\n".join(rest)


@functools.cache
def bare_imports() -> frozenset[str]:
    """What ``python -c pass`` imports here (site, encodings, .pth hooks)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "pass"],
        capture_output=True,
        text=True,
        check=True,
    )
    return frozenset(imported(done.stderr)[0])


def run(
    bench: Bench,
    argv: list[str],
    event: dict[str, Any] | str,
    agent: Agent,
    **extra: str,
) -> Run:
    """Run a hook command under ``-X importtime`` with ``event`` on stdin."""
    data = event if isinstance(event, str) else json.dumps(event)
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *argv],
        input=data.encode(),
        capture_output=True,
        env=bench.env(agent, **extra),
        cwd=bench.repo,
        timeout=60,
        check=False,
    )
    modules, err = imported(done.stderr.decode())
    return Run(done.returncode, done.stdout, err, modules - bare_imports())


def fleetbus_hook(
    bench: Bench, name: str, event: dict[str, Any] | str, agent: Agent, **extra: str
) -> Run:
    """``fleetbus hook NAME``, as the installer writes it."""
    fleetbus = str(Path(sys.executable).parent / "fleetbus")
    return run(bench, [fleetbus, "hook", name], event, agent, **extra)


def full_hook(
    bench: Bench, name: str, event: dict[str, Any] | str, agent: Agent, **extra: str
) -> Run:
    """The full hook, which never hands the event to the sidecar."""
    return run(bench, ["-m", "fleetbus.agents.hooks", name], event, agent, **extra)


def same_answer(fast: Run, full: Run) -> bool:
    """Whether two runs wrote the same bytes, but for ages that move with the
    clock ("3 s ago")."""
    return (fast.code, _AGE.sub(b"(age)", fast.out)) == (
        full.code,
        _AGE.sub(b"(age)", full.out),
    )


def edit_event(agent: Agent, bench: Bench, path: str) -> dict[str, Any]:
    """Claude Code's PreToolUse for an Edit of ``path`` by ``agent``."""
    return claude_event(
        agent.sid, str(bench.repo), "PreToolUse", "Edit", {"file_path": path}
    )


def gemini_write(agent: Agent, bench: Bench, path: str) -> dict[str, Any]:
    """Gemini CLI's BeforeTool for a write_file of ``path``."""
    return {
        "session_id": agent.sid,
        "cwd": str(bench.repo),
        "hook_event_name": "BeforeTool",
        "tool_name": "write_file",
        "tool_input": {"file_path": path, "content": "x"},
    }


def codex_patch(agent: Agent, bench: Bench) -> dict[str, Any]:
    """Codex's PreToolUse for an apply_patch of :data:`PATCH`."""
    return {
        "session_id": agent.sid,
        "cwd": str(bench.repo),
        "hook_event_name": "PreToolUse",
        "tool_name": "apply_patch",
        "tool_input": {"command": PATCH},
    }


def test_answered_by_the_sidecar_a_hook_imports_only_socket_and_hash(
    bench: Bench,
) -> None:
    """With the sidecar up, an edit's hook loads no json, re, typing or hooks."""
    a = bench.agent("sess-a")
    bench.edit(a, str(bench.repo / "a.py"))

    held = fleetbus_hook(bench, "claude-code", edit_event(a, bench, "a.py"), a)

    assert (held.code, held.out, held.err) == (0, b"", "")
    assert "fleetbus.agents.hookclient" in held.modules
    assert held.modules <= FAST_IMPORTS
    assert {m for m in held.modules if m.startswith(NEVER_FAST)} == set()


def test_the_first_hook_of_a_session_takes_the_full_way(bench: Bench) -> None:
    """No sidecar yet: the full hook starts one; the next hook goes short."""
    a = bench.agent("sess-a")
    event = edit_event(a, bench, "a.py")

    first = fleetbus_hook(bench, "claude-code", event, a)
    second = fleetbus_hook(bench, "claude-code", event, a)

    assert (first.code, first.out, first.fast) == (0, b"", False)
    assert (second.code, second.out, second.fast) == (0, b"", True)
    assert bench.held_by("sess-a") == ["a.py"]


def test_short_and_full_ways_deny_in_the_same_bytes(bench: Bench) -> None:
    """Claude Code, Codex and Gemini CLI denials are byte for byte the same."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    cx, ga, gb = bench.agent("codex-x"), bench.agent("gem-a"), bench.agent("gem-b")
    bench.edit(a, str(bench.repo / "a.py"))
    bench.hook("gemini", gemini_write(ga, bench, "b.py"), ga)
    for agent, name, event in [
        (b, "claude-code", edit_event(b, bench, str(bench.root / "elsewhere.py"))),
        (cx, "codex", codex_patch(cx, bench)),
        (gb, "gemini", gemini_write(gb, bench, "a.py")),
    ]:
        full_hook(bench, name, event, agent)  # starts the sidecar

    for agent, name, event in [
        (b, "claude-code", edit_event(b, bench, "a.py")),
        (cx, "codex", codex_patch(cx, bench)),
        (gb, "gemini", gemini_write(gb, bench, "b.py")),
    ]:
        fast = fleetbus_hook(bench, name, event, agent)
        full = full_hook(bench, name, event, agent)

        assert fast.fast, (name, fast.err)
        assert b'"deny"' in fast.out, (name, fast.out, fast.err)
        assert same_answer(fast, full), (fast.out, full.out)


def test_short_and_full_ways_claim_with_facts_in_the_same_bytes(
    bench: Bench,
) -> None:
    """An auto-claim bringing a fact, and Gemini CLI's {}, are the same bytes."""
    a, b, c = bench.agent("sess-a"), bench.agent("sess-b"), bench.agent("sess-c")
    ga, gb = bench.agent("gem-a"), bench.agent("gem-b")
    bench.edit(a, str(bench.repo / "a.py"))
    bench.edit(b, str(bench.root / "elsewhere.py"))
    bench.hook("gemini", gemini_write(ga, bench, str(bench.root / "x.py")), ga)
    bench.call(
        a,
        {
            "op": "publish",
            "topics": ["b.py", "src/c.py"],
            "text": "generated; edit gen.py instead",
            "kind": "gotcha",
        },
    )

    fast = fleetbus_hook(bench, "claude-code", edit_event(b, bench, "b.py"), b)
    full = full_hook(bench, "claude-code", edit_event(c, bench, "src/c.py"), c)
    gemini_fast = fleetbus_hook(bench, "gemini", gemini_write(ga, bench, "g.py"), ga)
    gemini_full = full_hook(bench, "gemini", gemini_write(gb, bench, "src/x.py"), gb)

    assert fast.fast
    assert b"[gotcha] b.py, src/c.py: generated" in fast.out
    assert same_answer(fast, full), (fast.out, full.out)
    assert bench.held_by("sess-b") == ["b.py"]
    assert bench.held_by("sess-c") == ["src/c.py"]
    assert gemini_fast.fast
    assert (gemini_fast.out, gemini_full.out) == (b"{}\n", b"{}\n")


def test_short_and_full_ways_stay_quiet_alike(bench: Bench) -> None:
    """A held file, a path outside the repo, a read, Gemini's no-op: same bytes."""
    a, g = bench.agent("sess-a"), bench.agent("gem-g")
    bench.edit(a, str(bench.repo / "a.py"))
    bench.hook("gemini", gemini_write(g, bench, "b.py"), g)
    read = claude_event(
        a.sid, str(bench.repo), "PreToolUse", "Read", {"file_path": "a.py"}
    )
    gemini_read = {**gemini_write(g, bench, "b.py"), "tool_name": "read_file"}
    cases: list[tuple[Agent, str, dict[str, Any]]] = [
        (a, "claude-code", edit_event(a, bench, "a.py")),
        (a, "claude-code", edit_event(a, bench, str(bench.root / "out.py"))),
        (a, "claude-code", read),
        (g, "gemini", gemini_write(g, bench, "b.py")),
        (g, "gemini", gemini_read),
    ]

    for agent, name, event in cases:
        fast = fleetbus_hook(bench, name, event, agent)
        full = full_hook(bench, name, event, agent)

        assert fast.fast, (event, fast.err)
        assert fast.out == full.out == (b"{}\n" if name == "gemini" else b"")
        assert (fast.code, fast.err) == (full.code, full.err) == (0, "")


def test_malformed_events_are_left_to_the_full_hook(bench: Bench) -> None:
    """With a sidecar up, malformed input still gets its one line on stderr."""
    a = bench.agent("sess-a")
    bench.edit(a, str(bench.repo / "a.py"))
    no_path = claude_event(a.sid, str(bench.repo), "PreToolUse", "Edit", {})
    cut = json.dumps(edit_event(a, bench, "a.py"))[:-1]

    for event in (no_path, cut):
        fast = fleetbus_hook(bench, "claude-code", event, a)
        full = full_hook(bench, "claude-code", event, a)

        assert not fast.fast
        assert (fast.code, fast.out) == (full.code, full.out) == (1, b"")
        assert fast.err == full.err
        assert "malformed" in fast.err


def test_an_event_the_plain_reading_gets_wrong_is_left_to_the_full_hook(
    bench: Bench,
) -> None:
    """A nested session_id leads to another session's sidecar, which declines."""
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    bench.edit(a, str(bench.repo / "a.py"))
    event = (
        '{"tool_input": {"session_id": "sess-a", "file_path": "b.py"}, '
        f'"session_id": "sess-b", "cwd": {json.dumps(str(bench.repo))}, '
        '"hook_event_name": "PreToolUse", "tool_name": "Edit"}'
    )

    hooked = fleetbus_hook(bench, "claude-code", event, b)

    assert (hooked.code, hooked.out, hooked.fast) == (0, b"", False)
    assert bench.held_by("sess-a") == ["a.py"]
    assert bench.held_by("sess-b") == ["b.py"]


class OldSidecar:
    """A sidecar from before the short way: JSON lines only, on a thread.

    It answers any pre_edit as a claim of nothing and anything that is not
    JSON as the error the old sidecar sent, and records every request line.
    """

    def __init__(self, path: str) -> None:
        self.lines: list[bytes] = []
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as stream:
                line = stream.readline()
                if line:
                    self.lines.append(line)
                    conn.sendall(self._reply(line))

    def _reply(self, line: bytes) -> bytes:
        try:
            json.loads(line)
        except ValueError:
            error = {"code": "protocol", "message": "a request is one line of JSON"}
            return json.dumps({"ok": False, "error": error}).encode() + b"\n"
        reply = {"ok": True, "inside": ["a.py"], "deny": False, "holders": []}
        return json.dumps({**reply, "claimed": ["a.py"], "facts": []}).encode() + b"\n"

    def close(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(DEADLINE_S)


def test_an_older_sidecar_gets_the_full_hook(bench: Bench) -> None:
    """A sidecar that knows only JSON lines: the hook falls back and is answered."""
    a = bench.agent("sess-old")
    old = OldSidecar(hookclient.sidecar_file(a.sid, ".sock"))
    try:
        hooked = fleetbus_hook(bench, "claude-code", edit_event(a, bench, "a.py"), a)
    finally:
        old.close()

    assert (hooked.code, hooked.out, hooked.err, hooked.fast) == (0, b"", "", False)
    assert old.lines[0].startswith(b"fleetbus-hook/1 claude-code ")
    assert json.loads(old.lines[-1])["op"] == "pre_edit"


def test_a_broker_gone_after_the_join_stalls_one_edit_not_each(
    bench: Bench, broker: BrokerProcess
) -> None:
    """The broker dies under a joined sidecar: the first edit waits out the
    request timeout and fails open; the next ones wait only for a broker that
    came back; once it is back, an edit claims again."""
    a = bench.agent("sess-a")
    assert bench.edit(a, str(bench.repo / "a.py")).decision is None
    assert bench.held_by("sess-a") == ["a.py"]

    broker.kill()
    slow = bench.edit(a, str(bench.repo / "b.py"))
    fast = bench.edit(a, str(bench.repo / "src" / "c.py"))

    for hooked in (slow, fast):
        assert hooked.code == 0
        assert hooked.decision is None
        assert hooked.answer is not None
        assert "fleetbus" in hooked.answer["systemMessage"]
    assert fast.seconds < slow.seconds
    log = "".join(map(_read, (bench.run_dir / "fleetbus").glob("sc-*.log")))
    assert log.count("sidecar.broker_away") == 1

    broker.start()
    # A path not edited while the broker was away: a request the sidecar gave
    # up on may still reach the broker once it is back.
    deadline = time.monotonic() + 30
    while "d.py" not in bench.held_by("sess-a"):
        assert time.monotonic() < deadline, "no edit claimed after the restart"
        assert bench.edit(a, str(bench.repo / "d.py")).decision is None
    log = "".join(map(_read, (bench.run_dir / "fleetbus").glob("sc-*.log")))
    assert "sidecar.broker_back" in log


def test_a_starting_sidecar_removes_files_left_by_sessions_long_gone(
    bench: Bench,
) -> None:
    """Files of a session untouched for over a week, whose locks are free, go;
    the files of the starting session and recent ones stay."""
    directory = bench.run_dir / "fleetbus"
    directory.mkdir(mode=0o700, exist_ok=True)
    old = time.time() - 8 * 24 * 3600
    gone = [directory / f"sc-0123456789abcdef.{s}" for s in ("lock", "start", "log")]
    recent = directory / "sc-fedcba9876543210.log"
    for path in [*gone, recent]:
        path.write_text("1\n")
    for path in gone:
        os.utime(path, (old, old))
    a = bench.agent("sess-a")

    assert bench.edit(a, str(bench.repo / "a.py")).decision is None

    assert not any(path.exists() for path in gone)
    assert recent.exists()
    assert os.path.exists(hookclient.sidecar_file("sess-a", ".lock"))
    log = "".join(map(_read, directory.glob("sc-*.log")))
    assert '"sessions":1' in log
    assert "sidecar.tidied" in log


def test_an_edit_in_another_worktree_of_the_repo_is_judged_by_its_path_there(
    bench: Bench,
) -> None:
    """A session editing a file in a sibling worktree, or in a worktree nested
    in its own, claims and is refused by the file's path in that worktree."""
    sibling = bench.root / "sibling"
    nested = bench.repo / "nested"
    for where, branch in ((sibling, "sib"), (nested, "nest")):
        subprocess.run(
            ["git", "worktree", "add", "-q", "-b", branch, str(where)],
            cwd=bench.repo,
            check=True,
        )
    a, b = bench.agent("sess-a"), bench.agent("sess-b")
    in_sibling = claude_event(
        "sess-b",
        str(sibling),
        "PreToolUse",
        "Edit",
        {"file_path": str(sibling / "a.py")},
    )
    assert bench.hook("claude-code", in_sibling, b).decision is None
    assert bench.held_by("sess-b") == ["a.py"]

    refused = bench.edit(a, str(sibling / "a.py"))
    nested_edit = bench.edit(a, str(nested / "b.py"))

    assert refused.decision == "deny"
    assert "a.py is held by claude-code@sib#sess-b" in refused.reason
    assert nested_edit.decision is None
    assert bench.held_by("sess-a") == ["b.py"]
