"""The git guard's verdicts and git output parsing, without git or a broker."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetbus.agents import gitguard
from fleetbus.agents.gitguard import Fence, judge
from fleetbus.claims import ClaimTable, ClaimView, Mode, Now
from fleetbus.scope import parse_scope
from fleetbus.sequence import Sequence

NOW = Now(wall=1_700_000_000.0, mono=100.0)


class Table:
    """A claim table with sessions joined on demand."""

    def __init__(self) -> None:
        self.table = ClaimTable("git:test", Sequence())
        self.rids = 0

    def claim(self, sid: str, *scopes: str, mode: Mode = "exclusive") -> int:
        if sid not in self.table.view.sessions:
            self.table.join(sid, sid, {}, leased=True, lease_s=60.0, now=NOW)
        self.rids += 1
        out = self.table.claim(
            sid,
            [parse_scope(s) for s in scopes],
            mode=mode,
            intent=f"{sid}'s work",
            ttl_s=None,
            wait_s=None,
            rid=f"r{self.rids}",
            now=NOW,
        )
        assert out.reply is not None
        fence: int = out.reply["fence"]
        return fence

    @property
    def view(self) -> ClaimView:
        return self.table.view


def test_other_sessions_claim_is_named() -> None:
    """The refusal names the holder, the scope and the intent."""
    table = Table()
    table.claim("alice", "src/")

    problems = judge(["src/a.py", "README"], table.view, "bob")

    assert len(problems) == 1
    assert problems[0].startswith("src/a.py: src/ is held by alice")
    assert "alice's work" in problems[0]


def test_own_claims_and_unclaimed_paths_pass() -> None:
    """Nothing is said about the committer's own claims or free paths."""
    table = Table()
    table.claim("alice", "a.py")

    assert judge(["a.py", "b.py"], table.view, "alice") == []


def test_shared_claims_on_both_sides_agree() -> None:
    """Two shared claims on a path share it; an exclusive one elsewhere does not."""
    table = Table()
    table.claim("alice", "docs/", mode="shared")
    table.claim("bob", "docs/", mode="shared")

    assert judge(["docs/x.md"], table.view, "bob") == []
    assert judge(["docs/x.md"], table.view, "carol") != []


def test_fence_still_held_passes_and_a_lost_one_is_stale() -> None:
    """A recorded fence must match the broker's row of the same scope."""
    table = Table()
    fence = table.claim("alice", "a.py")
    row = table.view.claims("alice")[0]
    current = {row.id: Fence(row.id, "a.py", fence)}
    lost = {"gone.1": Fence("gone.1", "a.py", fence - 1)}
    released = {"gone.2": Fence("gone.2", "b.py", 1)}

    assert judge(["a.py"], table.view, "alice", current) == []
    assert (
        f"(fence {fence - 1}) was lost" in judge(["a.py"], table.view, "alice", lost)[0]
    )
    assert "no longer held" in judge(["b.py"], table.view, "alice", released)[0]
    assert judge(["c.py"], table.view, "alice", released) == []


@pytest.mark.parametrize(
    ("output", "paths"),
    [
        ("", []),
        ("M\0a.py\0", ["a.py"]),
        ("R087\0old.py\0new.py\0M\0b.py\0", ["old.py", "new.py", "b.py"]),
        ("C100\0a.py\0copy.py\0D\0gone.py\0", ["a.py", "copy.py", "gone.py"]),
        ("A\0with space.py\0A\0tab\tname\0", ["with space.py", "tab\tname"]),
    ],
)
def test_name_status_parsing(output: str, paths: list[str]) -> None:
    """Both paths of renames and copies; names with any characters."""
    assert gitguard._name_status(output) == paths


def test_hook_script_runs_the_named_executable_and_chains() -> None:
    """The script carries the marker and falls back to the chained hook."""
    text = gitguard.hook_script("pre-push", "/opt/my env/bin/fleetbus")

    assert text.splitlines()[1] == gitguard.MARKER
    assert "fleetbus='/opt/my env/bin/fleetbus'" in text
    assert 'exec "$fleetbus" guard pre-push "$@"' in text
    assert "pre-push.fleetbus-chained" in text


def test_ledger_replaces_a_scope_and_forgets(tmp_path: Path) -> None:
    """A new grant of a scope replaces the old record; forget drops it."""
    import subprocess

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    table = Table()
    table.claim("alice", "a.py")
    first = table.view.claims("alice")
    gitguard.record_grant(tmp_path, "alice@host", first)
    table.table.release("alice", grant=first[0].grant, now=NOW)
    table.claim("alice", "a.py")
    second = table.view.claims("alice")

    gitguard.record_grant(tmp_path, "alice@host", second)

    recorded = gitguard.recorded_fences(tmp_path, "alice@host")
    assert list(recorded) == [second[0].id]
    gitguard.forget_claims(tmp_path, "alice@host", [second[0].id])
    assert gitguard.recorded_fences(tmp_path, "alice@host") == {}
