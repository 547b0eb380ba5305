"""Repository identity from git, and scopes resolved against a worktree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fleetbus.errors import BadInput, BadScope
from fleetbus.repo import RepoInfo, discover, repo_path, resolve_scope

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
}


def git(cwd: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    repo = tmp_path / "origin"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "src").mkdir()
    (repo / "src" / "a.py").write_text("a = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "first")
    (repo / "b.py").write_text("b = 1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "second")
    return repo


def test_identity_is_the_root_commit(origin: Path) -> None:
    """The id names the first commit, not HEAD, and the branch is reported."""
    info = discover(origin)
    root = git(origin, "rev-list", "--max-parents=0", "HEAD")

    assert info == RepoInfo(id=f"git:{root}", root=origin.resolve(), branch="main")


def test_clone_and_worktree_share_the_identity(origin: Path, tmp_path: Path) -> None:
    """A clone and a linked worktree name the same repository, own roots."""
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(origin), str(clone))
    tree = tmp_path / "tree"
    git(origin, "worktree", "add", "-q", "-b", "feature", str(tree))

    ids = {discover(p).id for p in (origin, clone, tree)}

    assert len(ids) == 1
    assert discover(tree).root == tree.resolve()
    assert discover(tree).branch == "feature"


def test_subdirectory_and_file_find_the_worktree_root(origin: Path) -> None:
    """Discovery from inside the worktree reports its top directory."""
    assert discover(origin / "src").root == origin.resolve()
    assert discover(origin / "src" / "a.py").root == origin.resolve()


def test_detached_head_has_no_branch(origin: Path) -> None:
    """A detached HEAD still has an identity, but no branch."""
    git(origin, "checkout", "-q", "--detach")

    assert discover(origin).branch is None
    assert discover(origin).id.startswith("git:")


def test_outside_git_falls_back_to_the_real_path(tmp_path: Path) -> None:
    """A plain directory is named by its real path."""
    plain = tmp_path / "plain"
    plain.mkdir()
    link = tmp_path / "link"
    link.symlink_to(plain)

    info = discover(link)

    assert info == RepoInfo(
        id=f"path:{plain.resolve()}", root=plain.resolve(), branch=None
    )


def test_repository_without_commits_falls_back_to_its_root(tmp_path: Path) -> None:
    """With no commit there is no root commit; the worktree path names it."""
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    (empty / "sub").mkdir()

    info = discover(empty / "sub")

    assert info.id == f"path:{empty.resolve()}"
    assert info.root == empty.resolve()


def test_a_path_that_does_not_exist_is_bad_input(tmp_path: Path) -> None:
    """A mistyped --repo is refused, not taken as a repository of its own."""
    with pytest.raises(BadInput, match="no such file or directory"):
        discover(tmp_path / "missing" / "repo")


@pytest.fixture
def info(origin: Path) -> RepoInfo:
    return discover(origin)


def test_relative_text_is_repo_relative(info: RepoInfo) -> None:
    """Relative scopes pass through the scope rules unchanged."""
    assert resolve_scope("src/a.py", info).text == "src/a.py"
    assert resolve_scope("src/*.py", info).text == "src/*.py"
    assert resolve_scope("@db-migrations", info).is_resource


def test_existing_directory_takes_the_directory_form(info: RepoInfo) -> None:
    """A literal naming a directory covers everything beneath it."""
    assert resolve_scope("src", info).text == "src/"
    assert resolve_scope("missing", info).text == "missing"


def test_absolute_paths_map_through_the_root(info: RepoInfo) -> None:
    """Absolute paths inside the worktree become repo-relative."""
    assert resolve_scope(str(info.root / "src" / "a.py"), info).text == "src/a.py"
    assert resolve_scope(str(info.root / "src"), info).text == "src/"
    assert resolve_scope(f"{info.root}/src/", info).text == "src/"


def test_absolute_paths_through_a_symlinked_root(origin: Path, tmp_path: Path) -> None:
    """A path through a symlink to the worktree maps like the real one."""
    link = tmp_path / "via-link"
    link.symlink_to(origin)
    info = discover(origin)

    assert resolve_scope(str(link / "src" / "a.py"), info).text == "src/a.py"
    assert repo_path(str(link / "b.py"), info) == "b.py"


def test_symlinked_root_maps_real_paths(origin: Path, tmp_path: Path) -> None:
    """A session whose root is a symlink still maps the real path."""
    link = tmp_path / "via-link"
    link.symlink_to(origin)
    info = RepoInfo(id="git:x", root=link, branch=None)

    assert resolve_scope(str(origin / "src" / "a.py"), info).text == "src/a.py"


@pytest.mark.parametrize(
    ("text", "rule"),
    [("/etc/passwd", "outside_repo"), ("../x", "escape"), ("", "empty")],
)
def test_bad_scopes_are_refused_with_the_rule(
    info: RepoInfo, text: str, rule: str
) -> None:
    """Paths outside the worktree, escapes and empty text raise BadScope."""
    with pytest.raises(BadScope) as caught:
        resolve_scope(text, info)

    assert caught.value.details["rule"] == rule


def test_repo_path_normalises_and_refuses_outside(info: RepoInfo) -> None:
    """repo_path names paths as the claim table does."""
    assert repo_path("./src//a.py", info) == "src/a.py"
    assert repo_path(str(info.root / "b.py"), info) == "b.py"
    with pytest.raises(BadScope):
        repo_path("/elsewhere/b.py", info)
