"""The git guard in real repositories: two worktrees, two sessions, one broker."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetbus.agents import gitguard
from fleetbus.agents.install import fleetbus_executable
from fleetbus.client import Session, connect
from tests.support.brokerproc import BrokerProcess

_CLEARED = (
    *gitguard.SESSION_ENVS,
    "FLEETBUS_SESSION_ID",
    gitguard.GUARD_ENV,
    gitguard.FAIL_ENV,
)


@dataclass
class Fleet:
    """Two worktrees of one repository and the broker their guards ask."""

    main: Path
    other: Path
    remote: Path
    broker: BrokerProcess

    def env(self, sid: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
        env.update(FLEETBUS_URL=self.broker.url, FLEETBUS_SESSION=sid, **extra)
        return env

    def git(
        self, where: Path, *args: str, sid: str = "nobody", **extra: str
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", *args],
            cwd=where,
            env=self.env(sid, **extra),
            capture_output=True,
            text=True,
            check=False,
        )

    def commit(
        self, where: Path, sid: str, *paths: str, **extra: str
    ) -> subprocess.CompletedProcess[str]:
        for path in paths:
            file = where / path
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text(f"{file.read_text() if file.exists() else ''}{sid}\n")
        self.git(where, "add", "--", *paths, sid=sid)
        return self.git(where, "commit", "-q", "-m", f"{sid} edits", sid=sid, **extra)


def _run(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def fleet(short_tmp: Path, broker: BrokerProcess) -> Fleet:
    main = short_tmp / "main"
    main.mkdir()
    _run(main, "init", "-q", "-b", "main")
    _run(main, "config", "user.email", "t@example.com")
    _run(main, "config", "user.name", "T")
    for name in ("a.py", "b.py", "src/c.py"):
        (main / name).parent.mkdir(parents=True, exist_ok=True)
        (main / name).write_text(f"# {name}\n")
    _run(main, "add", ".")
    _run(main, "commit", "-q", "-m", "start")
    remote = short_tmp / "remote.git"
    _run(short_tmp, "init", "-q", "--bare", str(remote))
    _run(main, "remote", "add", "origin", str(remote))
    _run(main, "push", "-q", "origin", "main")
    other = short_tmp / "other"
    _run(main, "worktree", "add", "-q", "-b", "other", str(other))
    return Fleet(main, other, remote, broker)


@pytest.fixture
def sessions(fleet: Fleet) -> Iterator[Callable[[str, Path], Session]]:
    """Open SDK sessions on the fleet's broker; all are closed at teardown."""
    opened: list[Session] = []

    def open_session(sid: str, where: Path) -> Session:
        session = connect(fleet.broker.url, repo=where, session_id=sid, name=sid)
        opened.append(session)
        return session

    yield open_session
    for session in opened:
        session.close()


@pytest.fixture
def guarded(fleet: Fleet) -> Fleet:
    gitguard.install(fleet.main, fleetbus_executable())
    return fleet


def test_commit_on_another_sessions_claim_is_refused(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """Bob's commit of a file Alice claimed fails, naming her, her intent, since."""
    sessions("alice", guarded.main).claim("a.py", intent="rewrite the parser")

    done = guarded.commit(guarded.other, "bob", "a.py")

    assert done.returncode != 0
    assert "a.py is held by alice" in done.stderr
    assert "rewrite the parser" in done.stderr
    assert " since " in done.stderr
    assert guarded.git(guarded.other, "log", "-1", "--format=%s").stdout == "start\n"


def test_commit_on_own_claim_is_allowed(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """The holder of a claim commits the claimed file without complaint."""
    sessions("alice", guarded.main).claim("a.py", "src/", intent="mine")

    done = guarded.commit(guarded.main, "alice", "a.py", "src/c.py")

    assert done.returncode == 0, done.stderr
    assert "fleetbus" not in done.stderr


def test_unclaimed_paths_commit_while_others_are_claimed(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """A claim elsewhere in the repository does not stop an unrelated commit."""
    sessions("alice", guarded.main).claim("src/", intent="mine")

    done = guarded.commit(guarded.other, "bob", "b.py")

    assert done.returncode == 0, done.stderr


def test_rename_into_a_claimed_path_is_refused(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """Both sides of a rename count: the new path claimed by another refuses."""
    sessions("alice", guarded.main).claim("lib/parser.py", intent="new parser")
    (guarded.other / "lib").mkdir()
    guarded.git(guarded.other, "mv", "b.py", "lib/parser.py")

    done = guarded.git(guarded.other, "commit", "-q", "-m", "move", sid="bob")

    assert done.returncode != 0
    assert "lib/parser.py is held by alice" in done.stderr


def test_rename_out_of_a_claimed_path_is_refused(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """Moving away a file another session claimed is refused too."""
    sessions("alice", guarded.main).claim("b.py", intent="keep it")
    guarded.git(guarded.other, "mv", "b.py", "moved.py")

    done = guarded.git(guarded.other, "commit", "-q", "-m", "move", sid="bob")

    assert done.returncode != 0
    assert "b.py is held by alice" in done.stderr


def test_stale_fence_is_refused(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """A claim lost and taken again no longer carries the fence the session had."""
    alice = sessions("alice", guarded.main)
    first = alice.claim("a.py", intent="first")
    gitguard.record_grant(guarded.main, "alice", first.claims)
    alice.release(grant=first.id)
    again = alice.claim("a.py", intent="second")

    done = guarded.commit(guarded.main, "alice", "a.py")

    assert done.returncode != 0
    assert f"(fence {first.fence}) was lost" in done.stderr
    assert f"fence {again.fence}" in done.stderr


def test_released_claim_with_recorded_fence_is_refused(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """A session that believes it holds a claim the broker no longer has is told."""
    alice = sessions("alice", guarded.main)
    grant = alice.claim("a.py", intent="edit")
    gitguard.record_grant(guarded.main, "alice", grant.claims)
    alice.release(grant=grant.id)

    done = guarded.commit(guarded.main, "alice", "a.py")

    assert done.returncode != 0
    assert "is no longer held" in done.stderr


def test_current_fence_is_allowed(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """A recorded fence that the broker still holds lets the commit through."""
    alice = sessions("alice", guarded.main)
    grant = alice.claim("a.py", intent="edit")
    gitguard.record_grant(guarded.other, "alice", grant.claims)

    done = guarded.commit(guarded.main, "alice", "a.py")

    assert done.returncode == 0, done.stderr


def test_warn_mode_allows_with_a_warning(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """FLEETBUS_GUARD=warn reports the conflict and lets the commit happen."""
    sessions("alice", guarded.main).claim("a.py", intent="rewrite")

    done = guarded.commit(guarded.other, "bob", "a.py", FLEETBUS_GUARD="warn")

    assert done.returncode == 0, done.stderr
    assert "warning" in done.stderr
    assert "a.py is held by alice" in done.stderr


def _foreign_hook(directory: Path, name: str, status: int, mark: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    hook = directory / name
    hook.write_text(
        f"#!/bin/sh\necho ran >> '{mark}'\necho 'lint says no' >&2\nexit {status}\n"
    )
    hook.chmod(0o755)
    return hook


def test_existing_hook_is_chained_and_its_failure_fails_the_commit(
    fleet: Fleet, short_tmp: Path
) -> None:
    """The hook in place before the guard runs first, and can still say no."""
    hooks = gitguard.hooks_dir(fleet.main)
    mark = short_tmp / "ran"
    original = _foreign_hook(hooks, "pre-commit", 0, mark)
    gitguard.install(fleet.main, fleetbus_executable())

    assert fleet.commit(fleet.other, "bob", "b.py").returncode == 0
    assert mark.read_text() == "ran\n"

    (hooks / f"pre-commit{gitguard.CHAINED_SUFFIX}").write_text(
        f"#!/bin/sh\necho ran >> '{mark}'\necho 'lint says no' >&2\nexit 1\n"
    )
    done = fleet.commit(fleet.other, "bob", "b.py")
    assert done.returncode != 0
    assert "lint says no" in done.stderr

    gitguard.uninstall(fleet.main)
    assert not gitguard.is_ours(original)
    assert "lint says no" in original.read_text()
    assert not (hooks / f"pre-commit{gitguard.CHAINED_SUFFIX}").exists()


def test_install_twice_keeps_the_chained_hook(fleet: Fleet, short_tmp: Path) -> None:
    """A second install rewrites nothing and does not chain the guard to itself."""
    hooks = gitguard.hooks_dir(fleet.main)
    _foreign_hook(hooks, "pre-commit", 0, short_tmp / "ran")
    gitguard.install(fleet.main, fleetbus_executable())

    assert gitguard.install(fleet.main, fleetbus_executable()) == []
    chained = hooks / f"pre-commit{gitguard.CHAINED_SUFFIX}"
    assert not gitguard.is_ours(chained)


def test_core_hooks_path_is_respected(
    fleet: Fleet, short_tmp: Path, sessions: Callable[[str, Path], Session]
) -> None:
    """With core.hooksPath set, the guard goes there, and works from there."""
    custom = short_tmp / "shared-hooks"
    _run(fleet.main, "config", "core.hooksPath", str(custom))
    gitguard.install(fleet.other, fleetbus_executable())
    assert gitguard.is_ours(custom / "pre-commit")
    assert not (fleet.main / ".git" / "hooks" / "pre-commit").exists()
    sessions("alice", fleet.main).claim("a.py", intent="rewrite")

    done = fleet.commit(fleet.other, "bob", "a.py")

    assert done.returncode != 0
    assert "held by alice" in done.stderr


def test_release_on_commit(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """fleetbus.release=commit frees the committed files' claims, not the rest."""
    _run(guarded.main, "config", "fleetbus.release", "commit")
    alice = sessions("alice", guarded.main)
    alice.claim("a.py", "b.py", "src/", intent="work")

    done = guarded.commit(guarded.main, "alice", "a.py", "src/c.py")

    assert done.returncode == 0, done.stderr
    assert "released a.py" in done.stderr
    alice.wait_synced()
    held = sorted(row.scope.text for row in alice.claims(mine=True))
    assert held == ["b.py", "src/"]


def test_release_defaults_to_never(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """Without the setting, a commit leaves every claim in place."""
    alice = sessions("alice", guarded.main)
    alice.claim("a.py", intent="work")

    assert guarded.commit(guarded.main, "alice", "a.py").returncode == 0

    alice.wait_synced()
    assert [row.scope.text for row in alice.claims(mine=True)] == ["a.py"]


def test_push_of_a_claimed_path_is_refused(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """pre-push checks the pushed commits: a file claimed since is refused."""
    assert guarded.commit(guarded.other, "bob", "b.py").returncode == 0
    sessions("alice", guarded.main).claim("b.py", intent="hands off")

    done = guarded.git(guarded.other, "push", "-q", "origin", "other", sid="bob")

    assert done.returncode != 0
    assert "b.py is held by alice" in done.stderr
    assert "hands off" in done.stderr
    branches = guarded.git(guarded.remote, "branch", "--list", "other").stdout
    assert branches == ""


def test_push_of_unclaimed_paths_is_allowed_and_releases_on_push(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """An allowed push with fleetbus.release=push frees the pushed files' claims."""
    _run(guarded.main, "config", "fleetbus.release", "push")
    alice = sessions("alice", guarded.main)
    alice.claim("a.py", intent="work")
    assert guarded.commit(guarded.main, "alice", "a.py").returncode == 0

    done = guarded.git(guarded.main, "push", "-q", "origin", "main", sid="alice")

    assert done.returncode == 0, done.stderr
    alice.wait_synced()
    assert alice.claims(mine=True) == []


def test_a_push_the_remote_rejects_releases_nothing(
    guarded: Fleet, sessions: Callable[[str, Path], Session]
) -> None:
    """With fleetbus.release=push the claims go once the remote has taken the
    commits (its tracking ref moved), not when pre-push let the push go."""
    _run(guarded.main, "config", "fleetbus.release", "push")
    alice = sessions("alice", guarded.main)
    alice.claim("a.py", intent="work")
    assert guarded.commit(guarded.main, "alice", "a.py").returncode == 0
    gate = guarded.remote / "hooks" / "pre-receive"
    gate.write_text("#!/bin/sh\necho closed for now >&2\nexit 1\n")
    gate.chmod(0o755)

    rejected = guarded.git(guarded.main, "push", "-q", "origin", "main", sid="alice")
    alice.wait_synced()
    held = [row.scope.text for row in alice.claims(mine=True)]
    gate.unlink()
    # Another session's push moves another tracking ref: nothing of Alice's goes.
    assert guarded.commit(guarded.other, "bob", "b.py").returncode == 0
    other = guarded.git(guarded.other, "push", "-q", "origin", "other", sid="bob")
    alice.wait_synced()
    still = [row.scope.text for row in alice.claims(mine=True)]
    accepted = guarded.git(guarded.main, "push", "-q", "origin", "main", sid="alice")
    alice.wait_synced()

    assert rejected.returncode != 0
    assert "closed for now" in rejected.stderr
    assert held == ["a.py"]
    assert other.returncode == 0, other.stderr
    assert still == ["a.py"]
    assert accepted.returncode == 0, accepted.stderr
    assert "released a.py" in accepted.stderr
    assert alice.claims(mine=True) == []
    pending = guarded.git(guarded.main, "rev-parse", "--git-common-dir").stdout
    assert not (guarded.main / pending.strip() / "fleetbus-pushes").exists()


def test_broker_down_fails_open_unless_told_otherwise(guarded: Fleet) -> None:
    """No broker: a warning and the commit; FLEETBUS_FAIL=closed refuses."""
    guarded.broker.kill()

    refused = guarded.commit(guarded.other, "bob", "a.py", FLEETBUS_FAIL="closed")
    allowed = guarded.commit(guarded.other, "bob", "a.py")

    assert refused.returncode != 0
    assert "unreachable" in refused.stderr
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: not checked, the broker is unreachable" in allowed.stderr


def test_uninstall_removes_only_the_guard(fleet: Fleet) -> None:
    """Uninstalling leaves a hooks directory as it was before."""
    hooks = gitguard.hooks_dir(fleet.main)
    before = sorted(p.name for p in hooks.iterdir()) if hooks.exists() else []
    gitguard.install(fleet.main, fleetbus_executable())

    gitguard.uninstall(fleet.main)

    assert sorted(p.name for p in hooks.iterdir()) == before
