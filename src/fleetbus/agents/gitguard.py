"""The git guard: hooks that refuse commits and pushes on another session's claim.

``fleetbus install git`` writes four small shell hooks into the repository's
hooks directory (found with ``git rev-parse --git-path hooks``, so worktrees and
``core.hooksPath`` work). Each runs ``fleetbus guard <hook>``:

- **pre-commit** checks the staged paths (both sides of a rename);
- **pre-push** checks the paths changed by the commits being pushed;
- **post-commit** releases claims on the committed paths when
  ``git config fleetbus.release`` is ``commit``;
- **reference-transaction** releases them when it is ``push``, once the
  remote took the commits: git has no hook after a push, but it moves the
  remote-tracking ref to the pushed commit when the push succeeded. pre-push
  leaves a note per pushed commit (see :func:`expect_push`), and this hook
  releases what a note names when a remote-tracking ref moves to its commit.
  Its shell script starts nothing unless a note is waiting.

A path is refused when another session holds a claim on it (two shared claims
agree to share), or when the committing session's own claim on it is stale:
the fencing token it recorded when the claim was granted (see
:func:`record_grant`) no longer matches what the broker holds. A hook that was
already in place is kept beside ours and runs first; its failure fails the
commit. ``FLEETBUS_GUARD=warn`` turns refusals into warnings. An unreachable
broker lets the commit through with a warning unless ``FLEETBUS_FAIL=closed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fleetbus.claims import Claim, ClaimView
from fleetbus.errors import BadInput, BrokerUnavailable, FleetbusError
from fleetbus.repo import RepoInfo, discover
from fleetbus.scope import parse_scope

MARKER = "# fleetbus-guard"
"""The line that marks a hook as ours, for this module and for other tools."""

HOOKS = ("pre-commit", "pre-push", "post-commit", "reference-transaction")
"""The hooks the guard installs."""

CHAINED_SUFFIX = ".fleetbus-chained"
"""A hook that was in place before ours is kept under its name plus this."""

SESSION_ENVS = ("FLEETBUS_SESSION", "CLAUDE_CODE_SESSION_ID", "GEMINI_SESSION_ID")
"""Where the committing session's id is looked for, in order."""

PUSH_NOTES = "fleetbus/pushes"
"""Where pre-push leaves its notes, in the git common directory."""

PUSH_NOTE_MAX_AGE_S = 7 * 24 * 3600.0
"""A note no push has used for this long (a push the remote refused) goes."""

GUARD_ENV = "FLEETBUS_GUARD"
FAIL_ENV = "FLEETBUS_FAIL"
RELEASE_KEY = "fleetbus.release"
RELEASE_MODES = ("commit", "push", "never")

BROKER_TIMEOUT_S = 2.0
"""How long a hook waits for the broker before failing open (or closed)."""

_ZERO_SHA = frozenset("0")
_DIFF_FILTER = "--diff-filter=ACMRDTU"


# -- installing -----------------------------------------------------------------


def hooks_dir(repo: str | Path) -> Path:
    """The directory git runs hooks from, for the worktree at ``repo``."""
    root = _toplevel(Path(repo))
    text = _git(root, "rev-parse", "--git-path", "hooks").strip()
    path = Path(text)
    return path if path.is_absolute() else root / path


def hook_script(hook: str, fleetbus: str) -> str:
    """The shell text of one hook, running ``fleetbus`` at its absolute path."""
    chained = shlex.quote(hook + CHAINED_SUFFIX)
    run = f"""if [ -x "$fleetbus" ]; then
    exec "$fleetbus" guard {hook} "$@"
fi
echo "fleetbus: $fleetbus is missing; {hook} is not checked" >&2"""
    if hook == "reference-transaction":
        # Git runs it for every ref update: start Python only when a push
        # left a note and the update is done.
        notes = shlex.quote(f"/{PUSH_NOTES}")
        run = f"""if [ "$1" = committed ] && [ -x "$fleetbus" ] &&
    [ -d "$(git rev-parse --git-common-dir)"{notes} ]; then
    exec "$fleetbus" guard {hook} "$@"
fi"""
    return f"""#!/bin/sh
{MARKER}
# Written by `fleetbus install git`; `fleetbus install git --uninstall` removes
# it and puts back the hook it replaced, kept meanwhile as {hook}{CHAINED_SUFFIX}.
fleetbus={shlex.quote(fleetbus)}
{run}
chained="$(dirname "$0")/"{chained}
if [ -x "$chained" ]; then
    exec "$chained" "$@"
fi
exit 0
"""


def is_ours(path: Path) -> bool:
    """Whether the hook file at ``path`` was written by the guard."""
    try:
        head = path.read_text(encoding="utf-8", errors="replace")[:512]
    except OSError:
        return False
    return MARKER in head.splitlines()


def install(repo: str | Path, fleetbus: str) -> list[Path]:
    """Install the guard's hooks; returns the hook files written.

    A foreign hook already in place is renamed to ``<hook>.fleetbus-chained``
    and run first by ours. Installing again rewrites our hooks only.
    """
    directory = hooks_dir(repo)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for hook in HOOKS:
        path = directory / hook
        chained = directory / (hook + CHAINED_SUFFIX)
        if (path.exists() or path.is_symlink()) and not is_ours(path):
            if chained.exists() or chained.is_symlink():
                raise BadInput(
                    f"cannot install the {hook} guard: both {path} and {chained} "
                    "exist; move one of them away first"
                )
            path.rename(chained)
        text = hook_script(hook, fleetbus)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            _write_executable(path, text)
            written.append(path)
    return written


def uninstall(repo: str | Path) -> list[Path]:
    """Remove the guard's hooks and put back the ones they replaced."""
    directory = hooks_dir(repo)
    removed = []
    for hook in HOOKS:
        path = directory / hook
        if not is_ours(path):
            continue
        path.unlink()
        removed.append(path)
        chained = directory / (hook + CHAINED_SUFFIX)
        if chained.exists() or chained.is_symlink():
            chained.rename(path)
    return removed


def _write_executable(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.fleetbus-tmp")
    temp.write_text(text, encoding="utf-8")
    temp.chmod(0o755)
    temp.replace(path)


# -- the fence ledger -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fence:
    """A claim a session was granted, as it recorded it: id, scope and token."""

    id: str
    scope: str
    fence: int


def ledger_path(repo: str | Path, sid: str) -> Path:
    """Where the fences of session ``sid`` are kept for the repository at ``repo``.

    Inside the git common directory, so every worktree of a clone shares it.
    """
    root = _toplevel(Path(repo))
    common = Path(_git(root, "rev-parse", "--git-common-dir").strip())
    if not common.is_absolute():
        common = root / common
    return common / "fleetbus" / "fences" / (quote(sid, safe="") + ".json")


def record_grant(repo: str | Path, sid: str, claims: Iterable[Claim]) -> None:
    """Remember the fencing tokens of claims granted to ``sid``.

    Whatever claims on behalf of an agent session calls this, so that the
    guard can tell a claim the session still holds from one it lost. A new
    grant of a scope replaces what was recorded for that scope.
    """
    rows = {row.id: Fence(row.id, row.scope.text, row.fence) for row in claims}
    scopes = {fence.scope for fence in rows.values()}
    with _ledger(repo, sid) as fences:
        for cid in [k for k, v in fences.items() if v.scope in scopes]:
            del fences[cid]
        fences.update(rows)


def forget_claims(repo: str | Path, sid: str, ids: Iterable[str] | None = None) -> None:
    """Drop recorded fences of ``sid``: those of ``ids``, or all of them."""
    with _ledger(repo, sid) as fences:
        if ids is None:
            fences.clear()
        for cid in ids or ():
            fences.pop(cid, None)


def recorded_fences(repo: str | Path, sid: str) -> dict[str, Fence]:
    """The fences recorded for ``sid``, by claim id."""
    return _read_ledger(ledger_path(repo, sid))


@contextlib.contextmanager
def _ledger(repo: str | Path, sid: str) -> Iterator[dict[str, Fence]]:
    path = ledger_path(repo, sid)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        fences = _read_ledger(path)
        yield fences
        if fences:
            temp = path.with_suffix(".tmp")
            rows = [_fence_row(fence) for fence in fences.values()]
            temp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
            temp.replace(path)
        else:
            path.unlink(missing_ok=True)


def _fence_row(fence: Fence) -> dict[str, Any]:
    return {"id": fence.id, "scope": fence.scope, "fence": fence.fence}


def _read_ledger(path: Path) -> dict[str, Fence]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        fences = [Fence(str(r["id"]), str(r["scope"]), int(r["fence"])) for r in rows]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise BadInput(f"the fence ledger {path} is unreadable: {exc}") from exc
    return {fence.id: fence for fence in fences}


# -- judging --------------------------------------------------------------------


def committing_session() -> str:
    """The id of the session making the commit: from the environment, else the CLI's.

    ``FLEETBUS_SESSION``, else ``CLAUDE_CODE_SESSION_ID``, else
    ``GEMINI_SESSION_ID``, else the session of the agent (with a running
    sidecar) that the commit runs under, else the id the ``fleetbus`` CLI
    claims under.
    """
    for name in SESSION_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    from fleetbus.agents.hookclient import session_from_ancestry

    found = session_from_ancestry()
    if found is not None:
        return found
    from fleetbus.cli import session_id

    return session_id()


def judge(
    paths: Sequence[str],
    view: ClaimView,
    sid: str,
    fences: dict[str, Fence] | None = None,
) -> list[str]:
    """Why ``sid`` may not commit ``paths``, one sentence each; empty if it may.

    A path held by another session is refused unless both claims are shared.
    A recorded fence of ``sid`` whose scope matches a path must still be held
    at the broker, by ``sid``, with the same token.
    """
    return _foreign(paths, view, sid) + _stale(paths, view, sid, fences or {})


def _foreign(paths: Sequence[str], view: ClaimView, sid: str) -> list[str]:
    problems = []
    for path in paths:
        rows = view.holders(path)
        sharing = any(row.sid == sid and row.mode == "shared" for row in rows)
        for row in rows:
            if row.sid == sid or (sharing and row.mode == "shared"):
                continue
            where = "" if row.scope.text == path else f"{path}: "
            problems.append(where + row.describe())
    return problems


def _stale(
    paths: Sequence[str], view: ClaimView, sid: str, fences: dict[str, Fence]
) -> list[str]:
    problems = []
    mine = view.claims(sid)
    held = {row.id for row in mine}
    for fence in fences.values():
        scope = parse_scope(fence.scope)
        touched = [path for path in paths if scope.matches(path)]
        if not touched or fence.id in held:
            continue
        again = [row for row in mine if row.scope.text == fence.scope]
        if again:
            problems.append(
                f"{touched[0]}: your claim on {fence.scope} (fence {fence.fence}) "
                f"was lost; the one you hold now has fence {again[0].fence}: "
                "check the file for changes made meanwhile, then claim it again"
            )
        else:
            problems.append(
                f"{touched[0]}: your claim on {fence.scope} (fence {fence.fence}) "
                "is no longer held: it was released or expired; claim it again"
            )
    return problems


# -- paths from git -------------------------------------------------------------


def staged_paths(root: Path) -> list[str]:
    """The paths the next commit changes; both the old and new path of a rename."""
    against = "HEAD" if _has_head(root) else _empty_tree(root)
    return _name_status(
        _git(
            root, "diff", "--cached", "--name-status", "-z", "-M", _DIFF_FILTER, against
        )
    )


def committed_paths(root: Path, commit: str = "HEAD") -> list[str]:
    """The paths changed by ``commit``."""
    return _name_status(
        _git(
            root, "diff-tree", "-r", "--root", "--no-commit-id", "--name-status",
            "-z", "-M", _DIFF_FILTER, commit,
        )
    )  # fmt: skip


def pushed_paths(root: Path, remote: str, ref_lines: str) -> list[str]:
    """The paths changed by what a push sends, from the pre-push hook's stdin.

    Each line is ``<local ref> <local sha> <remote ref> <remote sha>``. A
    deletion sends nothing; an update diffs remote..local; a new branch (or a
    remote commit unknown here) covers the commits the remote does not have.
    """
    paths: list[str] = []
    for line in ref_lines.splitlines():
        fields = line.split()
        if len(fields) != 4 or set(fields[1]) <= _ZERO_SHA:
            continue
        local, theirs = fields[1], fields[3]
        if not set(theirs) <= _ZERO_SHA and _is_commit(root, theirs):
            paths += _name_status(
                _git(root, "diff", "--name-status", "-z", "-M", _DIFF_FILTER,
                     theirs, local)
            )  # fmt: skip
            continue
        listed = _git(root, "rev-list", local, "--not", f"--remotes={remote}")
        for commit in listed.split():
            paths += committed_paths(root, commit)
    return list(dict.fromkeys(paths))


def _name_status(output: str) -> list[str]:
    """Paths of ``--name-status -z`` output: two for a rename or copy."""
    fields = output.split("\0")
    paths: list[str] = []
    at = 0
    while at < len(fields) and fields[at]:
        status = fields[at]
        count = 2 if status[:1] in ("R", "C") else 1
        paths += fields[at + 1 : at + 1 + count]
        at += 1 + count
    return list(dict.fromkeys(paths))


def _has_head(root: Path) -> bool:
    return _git_status(root, "rev-parse", "--verify", "-q", "HEAD") == 0


def _is_commit(root: Path, sha: str) -> bool:
    return _git_status(root, "cat-file", "-e", f"{sha}^{{commit}}") == 0


def _empty_tree(root: Path) -> str:
    return _git(root, "hash-object", "-t", "tree", "/dev/null").strip()


def _toplevel(path: Path) -> Path:
    try:
        return Path(_git(path, "rev-parse", "--show-toplevel").strip())
    except BadInput:
        raise BadInput(f"{path} is not inside a git worktree") from None


def _git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BadInput(f"git {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def _git_status(cwd: Path, *args: str) -> int:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, check=False)
    return done.returncode


# -- running as a hook ----------------------------------------------------------


@dataclass
class _Hook:
    """What one hook run knows: where, who, and how strict."""

    name: str
    args: list[str]
    repo: RepoInfo
    sid: str
    warn_only: bool
    fail_closed: bool

    def say(self, text: str) -> None:
        print(f"fleetbus {self.name}: {text}", file=sys.stderr)


def run_hook(name: str, args: Sequence[str], url: str | None = None) -> int:
    """Run the guard as git hook ``name`` with git's ``args``; the exit status."""
    if name not in HOOKS:
        raise BadInput(f"unknown hook {name!r} (known: {', '.join(HOOKS)})")
    from fleetbus import log

    log.configure("error", stream=sys.stderr)
    stdin = sys.stdin.read() if name in ("pre-push", "reference-transaction") else ""
    repo = discover(os.getcwd())
    status = _run_chained(repo.root, name, args, stdin)
    if status != 0:
        return status
    hook = _Hook(
        name=name,
        args=list(args),
        repo=repo,
        sid=committing_session(),
        warn_only=os.environ.get(GUARD_ENV, "").lower() == "warn",
        fail_closed=os.environ.get(FAIL_ENV, "").lower() == "closed",
    )
    if name == "post-commit":
        if release_mode(repo.root) == "commit":
            _release(hook, committed_paths(repo.root), url)
        return 0
    if name == "reference-transaction":
        if args[:1] == ["committed"]:
            for note in pushed_notes(repo.root, stdin):
                _release(replace(hook, sid=note["sid"]), note["paths"], url)
        return 0
    if name == "pre-push":
        remote = args[0] if args else "origin"
        paths = pushed_paths(repo.root, remote, stdin)
    else:
        paths = staged_paths(repo.root)
    status = _check(hook, paths, url)
    if status == 0 and name == "pre-push" and release_mode(repo.root) == "push":
        expect_push(repo.root, hook.sid, stdin, paths)
    return status


def _notes_dir(root: Path) -> Path:
    common = Path(_git(root, "rev-parse", "--git-common-dir").strip())
    return (common if common.is_absolute() else root / common) / PUSH_NOTES


def expect_push(root: Path, sid: str, ref_lines: str, paths: list[str]) -> None:
    """Leave a note per commit pushed (pre-push's ``ref_lines``): once the
    remote takes it, ``sid``'s claims on ``paths`` are to be released.

    Notes older than :data:`PUSH_NOTE_MAX_AGE_S`, of pushes that never went
    through, are removed on the way.
    """
    shas = [f[1] for f in map(str.split, ref_lines.splitlines()) if len(f) == 4]
    shas = [sha for sha in shas if not set(sha) <= _ZERO_SHA]
    if not shas or not paths:
        return
    directory = _notes_dir(root)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in directory.iterdir():
        with contextlib.suppress(OSError):
            if now - old.stat().st_mtime > PUSH_NOTE_MAX_AGE_S:
                old.unlink()
    body = json.dumps({"sid": sid, "paths": paths})
    for sha in shas:
        temp = directory / f".{sha}.tmp"
        temp.write_text(body, encoding="utf-8")
        temp.replace(directory / sha)


def pushed_notes(root: Path, ref_lines: str) -> list[dict[str, Any]]:
    """The notes of pushes that went through, taken (removed) from the store.

    ``ref_lines`` are reference-transaction's: ``<old> <new> <ref>``. A push
    that went through moved a remote-tracking ref to the commit it sent.
    """
    directory = _notes_dir(root)
    taken = []
    for fields in map(str.split, ref_lines.splitlines()):
        if len(fields) != 3 or not fields[2].startswith("refs/remotes/"):
            continue
        note = directory / fields[1]
        try:
            data = json.loads(note.read_text(encoding="utf-8"))
            note.unlink()
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("sid"), str):
            taken.append(data)
    with contextlib.suppress(OSError):
        directory.rmdir()
    return taken


def release_mode(root: Path) -> str:
    """``git config fleetbus.release``: ``commit``, ``push`` or ``never``."""
    done = subprocess.run(
        ["git", "config", "--get", RELEASE_KEY],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    mode = done.stdout.strip().lower() or "never"
    return mode if mode in RELEASE_MODES else "never"


def _run_chained(root: Path, name: str, args: Sequence[str], stdin: str) -> int:
    """Run the hook ours replaced, if any, with the same arguments and input."""
    chained = hooks_dir(root) / (name + CHAINED_SUFFIX)
    if not os.access(chained, os.X_OK):
        return 0
    done = subprocess.run([str(chained), *args], input=stdin, text=True, check=False)
    return done.returncode


def _check(hook: _Hook, paths: list[str], url: str | None) -> int:
    if not paths:
        return 0
    try:
        snapshot = asyncio.run(_snapshot(hook.repo, url))
    except BrokerUnavailable as exc:
        if hook.fail_closed:
            hook.say(f"refused: the broker is unreachable ({exc.message})")
            return 1
        hook.say(f"warning: not checked, the broker is unreachable ({exc.message})")
        return 0
    view = ClaimView()
    view.load(snapshot)
    problems = judge(paths, view, hook.sid, recorded_fences(hook.repo.root, hook.sid))
    if not problems:
        return 0
    what = "commit" if hook.name == "pre-commit" else "push"
    verdict = "warning" if hook.warn_only else "refused"
    hook.say(f"{verdict}: this {what} touches claimed paths (you are {hook.sid}):")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if hook.warn_only:
        return 0
    hook.say(
        "wait for a claim with `fleetbus claim --wait SECONDS PATH`; "
        f"to {what} anyway, set {GUARD_ENV}=warn"
    )
    return 1


async def _snapshot(repo: RepoInfo, url: str | None) -> dict[str, Any]:
    from fleetbus.client import AsyncSession

    session = await AsyncSession.connect(
        url, repo=repo, join=False, replica=False, timeout=BROKER_TIMEOUT_S
    )
    try:
        return await session.snapshot()
    finally:
        await session.close(leave=False)


def _release(hook: _Hook, paths: list[str], url: str | None) -> None:
    """Release the committing session's claims on exactly these paths."""
    try:
        released = asyncio.run(_release_async(hook, paths, url))
    except FleetbusError as exc:
        hook.say(f"warning: claims not released: {exc.message}")
        return
    if released:
        hook.say(f"released {', '.join(released)} ({RELEASE_KEY})")


async def _release_async(hook: _Hook, paths: list[str], url: str | None) -> list[str]:
    from fleetbus.client import AsyncSession

    snapshot = await _snapshot(hook.repo, url)
    view = ClaimView()
    view.load(snapshot)
    wanted = set(paths)
    rows = [
        row
        for row in view.claims(hook.sid)
        if row.scope.is_literal and row.scope.text in wanted
    ]
    if not rows:
        return []
    session = await AsyncSession.connect(
        url,
        repo=hook.repo,
        session_id=hook.sid,
        leased=False,
        replica=False,
        timeout=BROKER_TIMEOUT_S,
    )
    try:
        scopes = [row.scope.text for row in rows]
        await session.release(*scopes)
    finally:
        await session.close(leave=False)
    forget_claims(hook.repo.root, hook.sid, [row.id for row in rows])
    return scopes
