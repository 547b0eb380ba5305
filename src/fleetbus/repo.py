"""Which repository a session works on, and its scopes in repo-relative form.

Sessions in different clones and worktrees of one repository share one claim
table, so a repository is named by its root commit rather than by a path. A
directory outside git, or a repository with no commit yet, is named by its real
path instead.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from fleetbus.errors import BadInput, BadScope
from fleetbus.scope import Scope, parse_scope, relative_path

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class RepoInfo:
    """A repository as a session sees it.

    ``id`` is shared by every clone and worktree (``git:<root commit>``) or is
    ``path:<real path>`` outside git; ``root`` is this worktree's top directory;
    ``branch`` is the checked-out branch, ``None`` when detached or outside git.
    """

    id: str
    root: Path
    branch: str | None


def discover(path: str | Path | None = None) -> RepoInfo:
    """Identify the repository that contains ``path`` (default: the cwd).

    Raises :class:`BadInput` when ``path`` does not exist.
    """
    given = path if path is not None else os.getcwd()
    start = Path(os.path.realpath(given))
    if not start.exists():
        raise BadInput(f"no such file or directory: {given}", field="repo")
    if not start.is_dir():
        start = start.parent
    head = _git(start, "rev-parse", "--show-toplevel", "--abbrev-ref", "HEAD")
    if head is None or not head[0]:
        return RepoInfo(id=f"path:{start}", root=start, branch=None)
    root = Path(os.path.realpath(head[0][0]))
    lines = head[0]
    if head[1] != 0 or len(lines) < 2:
        # A repository without a commit has no root commit to be named by.
        return RepoInfo(id=f"path:{root}", root=root, branch=None)
    roots = _git(root, "rev-list", "--max-parents=0", "HEAD")
    if roots is None or roots[1] != 0 or not roots[0]:
        return RepoInfo(id=f"path:{root}", root=root, branch=None)
    branch = lines[1] if lines[1] != "HEAD" else None
    # A history with several roots (merged projects) lists them newest first;
    # the last one is the oldest and is the same in every clone.
    return RepoInfo(id=f"git:{roots[0][-1]}", root=root, branch=branch)


def _git(cwd: Path, *args: str) -> tuple[list[str], int] | None:
    """Run git in ``cwd``; its stdout lines and exit status, or None if absent."""
    try:
        done = subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            check=False,
        )
    except OSError:
        return None
    return done.stdout.splitlines(), done.returncode


def resolve_scope(text: str, repo: RepoInfo) -> Scope:
    """Turn what a user or agent wrote into a canonical repo-relative scope.

    ``@name`` resources pass as they are. An absolute path is mapped through the
    worktree root (through symlinks too); other text is already repo-relative.
    A literal path naming an existing directory becomes the directory form.
    Anything else that breaks a scope rule raises :class:`BadScope`.
    """
    if text.startswith("@"):
        return parse_scope(text)
    if os.path.isabs(text):
        text = _map_absolute(text, repo.root)
    scope = parse_scope(text)
    if (
        not scope.is_resource
        and scope.is_literal
        and not scope.text.endswith("/")
        # os.path: a pathlib join and stat cost this call more than the claim.
        and os.path.isdir(os.path.join(repo.root, scope.text))
    ):
        scope = parse_scope(scope.text + "/")
    return scope


def repo_path(path: str, repo: RepoInfo) -> str:
    """``path`` as the claim table names it: repo-relative, normalised.

    Absolute paths are mapped through the worktree root; ``@name`` passes as
    it is. Raises :class:`BadScope` for a path outside the worktree.
    """
    if path.startswith("@"):
        return path
    if os.path.isabs(path):
        return _map_absolute(path, repo.root)
    return relative_path(path, str(repo.root))


def _map_absolute(text: str, root: Path) -> str:
    """Map an absolute path into the worktree, trying real paths second."""
    try:
        mapped = relative_path(text, str(root))
    except BadScope:
        if _GLOB_CHARS.intersection(text):
            raise
        mapped = relative_path(os.path.realpath(text), os.path.realpath(root))
    # The mapping normalises the text; a trailing "/" still means a directory.
    return mapped + "/" if text.endswith("/") and mapped != "." else mapped
