"""The Claude Code PreToolUse hook on an edit, against ``python -c pass``.

Both are timed from process start to exit, interleaved one by one, from the
same venv interpreter. The hook talks to its session's sidecar (started by
the first, untimed, call) which talks to a private broker.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

from bench.context import Run
from bench.harness import PYTHON, Broker, child_env, run_timed
from bench.stats import quantile

FLEETBUS = str(Path(PYTHON).parent / "fleetbus")


def run(ctx: Run) -> None:
    """``hook_p50_ms`` and ``python_start_p50_ms``, and their ratio."""
    folder = ctx.folder("hook")
    rounds = ctx.scale(15, 40)
    base: list[float] = []
    hook: list[float] = []
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(Broker(folder))
        repo = _git_repo(folder / "repo")
        env = _hook_env(folder, broker.url)
        stack.callback(_stop_sidecar, env, repo)
        command = _hook_command(env, repo)
        if command is None:
            for name in ("hook_p50_ms", "hook_ratio"):
                ctx.report.missing(name, "no `fleetbus hook claude-code` command here")
        event = json.dumps(_edit_event(env, repo)).encode()
        for _ in range(ctx.reps):
            base_times, hook_times = [], []
            for _ in range(rounds):
                base_times.append(run_timed([PYTHON, "-c", "pass"]))
                if command is not None:
                    hook_times.append(_timed(command, event, env, repo))
            base.append(quantile(base_times, 0.5))
            if hook_times:
                hook.append(quantile(hook_times, 0.5))
    report = ctx.report
    report.add("python_start_p50_ms", base, "ms")
    report.note("python_start_p50_ms", f"{PYTHON} -c pass, {rounds} per repetition")
    if hook:
        report.add("hook_p50_ms", hook, "ms")
        report.ratio("hook_ratio", hook, base)
        report.note(
            "hook_p50_ms",
            "fleetbus hook claude-code, PreToolUse Edit of a free file, sidecar "
            "warm, interleaved with python -c pass",
        )


def _git_repo(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "src").mkdir(exist_ok=True)
    (path / "src" / "app.py").write_text("x = 1\n")
    for args in (
        ["init", "-q"],
        ["add", "."],
        ["-c", "user.name=b", "-c", "user.email=b@b", "commit", "-qm", "init"],
    ):
        subprocess.run(["git", "-C", str(path), *args], check=True)
    return path


def _hook_env(folder: Path, url: str) -> dict[str, str]:
    runtime = folder / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env = child_env()
    env.update(
        XDG_RUNTIME_DIR=str(runtime),
        FLEETBUS_URL=url,
        CLAUDE_CODE_SESSION_ID=f"bench-hook-{os.getpid()}",
        FLEETBUS_AGENT_PID=str(os.getpid()),
    )
    return env


def _edit_event(env: dict[str, str], repo: Path) -> dict[str, object]:
    return {
        "session_id": env["CLAUDE_CODE_SESSION_ID"],
        "hook_event_name": "PreToolUse",
        "tool_name": "Edit",
        "tool_input": {"file_path": str(repo / "src" / "app.py")},
        "cwd": str(repo),
    }


def _hook_command(env: dict[str, str], repo: Path) -> list[str] | None:
    """The hook's command line, once a first call has started the sidecar."""
    if not shutil.which(FLEETBUS):
        return None
    command = [FLEETBUS, "hook", "claude-code"]
    event = json.dumps(_edit_event(env, repo)).encode()
    done = subprocess.run(
        command, input=event, env=env, cwd=repo, capture_output=True, check=False
    )
    return command if done.returncode == 0 else None


def _timed(command: list[str], event: bytes, env: dict[str, str], repo: Path) -> float:
    import time

    began = time.perf_counter()
    subprocess.run(
        command,
        input=event,
        env=env,
        cwd=repo,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return (time.perf_counter() - began) * 1000


def _stop_sidecar(env: dict[str, str], repo: Path) -> None:
    """End the hook's session (SessionEnd), then make sure its sidecar is gone."""
    end = {
        "session_id": env["CLAUDE_CODE_SESSION_ID"],
        "hook_event_name": "SessionEnd",
        "cwd": str(repo),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(
            [FLEETBUS, "hook", "claude-code"],
            input=json.dumps(end).encode(),
            env=env,
            cwd=repo,
            capture_output=True,
            timeout=20,
            check=False,
        )
    runtime = Path(env["XDG_RUNTIME_DIR"]) / "fleetbus"
    for lock in runtime.glob("sc-*.lock"):
        text = lock.read_text().strip()
        if text.isdigit():
            with contextlib.suppress(OSError):
                os.kill(int(text), signal.SIGTERM)
