"""Files of sidecars long gone are removed; anything held or recent stays."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from fleetbus.agents.tidy import MAX_AGE_S, prune_sidecar_files

NOW = 2_000_000_000.0
OLD = NOW - MAX_AGE_S - 60
RECENT = NOW - 60


def _session(directory: Path, key: str, mtime: float, suffixes: str) -> list[Path]:
    paths = []
    for suffix in suffixes.split(","):
        path = directory / f"sc-{key}.{suffix}"
        path.write_text("1\n")
        os.utime(path, (mtime, mtime))
        paths.append(path)
    return paths


def test_only_old_unheld_sessions_of_others_are_removed(tmp_path: Path) -> None:
    stale = _session(tmp_path, "stale", OLD, "lock,start,log")
    logonly = _session(tmp_path, "logonly", OLD, "log")
    recent = _session(tmp_path, "recent", RECENT, "lock,start,log")
    # One file touched lately keeps the whole session.
    mixed = _session(tmp_path, "mixed", OLD, "lock,start")
    mixed += _session(tmp_path, "mixed", RECENT, "log")
    mine = _session(tmp_path, "mine", OLD, "lock,start,log")
    running = _session(tmp_path, "running", OLD, "lock,start,log")
    starting = _session(tmp_path, "starting", OLD, "lock,start,log")
    other = tmp_path / "notes.log"
    other.write_text("x")
    os.utime(other, (OLD, OLD))

    with open(running[0]) as lifetime, open(starting[1]) as start:
        fcntl.flock(lifetime, fcntl.LOCK_EX)
        fcntl.flock(start, fcntl.LOCK_EX)
        removed = prune_sidecar_files(tmp_path, "mine", now=NOW)

    assert removed == ["logonly", "stale"]
    for path in stale + logonly:
        assert not path.exists()
    for path in recent + mixed + mine + running + starting + [other]:
        assert path.exists()


def test_a_missing_directory_removes_nothing(tmp_path: Path) -> None:
    assert prune_sidecar_files(tmp_path / "absent", "mine", now=NOW) == []
