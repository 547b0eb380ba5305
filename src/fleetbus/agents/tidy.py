"""Removing the files of sidecars long gone from the runtime directory.

Each agent session leaves ``sc-<key>.{lock,start,log}`` behind (its socket
goes with it). A sidecar that starts removes the files of other sessions that
nobody has touched for :data:`MAX_AGE_S` and that no process holds: their
lifetime lock and their start lock must both be free, so neither a running
sidecar nor a hook starting one loses its files.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

#: Files of a session untouched this long (seconds) are removed: a week.
MAX_AGE_S = 7 * 24 * 3600.0

_PREFIX = "sc-"
_SUFFIXES = (".lock", ".start", ".log", ".sock")


def prune_sidecar_files(
    directory: Path, keep: str, *, now: float, max_age_s: float = MAX_AGE_S
) -> list[str]:
    """Remove the files of stale sessions in ``directory``; their keys.

    ``keep`` is the calling sidecar's own key, never touched. A session is
    stale when the newest of its files is older than ``max_age_s`` before
    ``now`` (wall clock) and its locks can be taken without waiting.
    """
    removed = []
    for key, paths in sorted(_sessions(directory).items()):
        if key == keep or not paths:
            continue
        try:
            newest = max(path.stat().st_mtime for path in paths)
        except FileNotFoundError:
            continue
        if now - newest < max_age_s:
            continue
        with _free(directory / f"{_PREFIX}{key}") as free:
            if not free:
                continue
            for path in paths:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        removed.append(key)
    return removed


def _sessions(directory: Path) -> dict[str, list[Path]]:
    """The sidecar files in ``directory``, by session key."""
    found: dict[str, list[Path]] = {}
    try:
        names = os.listdir(directory)
    except OSError:
        return found
    for name in names:
        if not name.startswith(_PREFIX):
            continue
        stem, dot, suffix = name.rpartition(".")
        if not dot or f".{suffix}" not in _SUFFIXES:
            continue
        found.setdefault(stem.removeprefix(_PREFIX), []).append(directory / name)
    return found


@contextlib.contextmanager
def _free(base: Path) -> Iterator[bool]:
    """Hold the lifetime and start locks of ``base`` if both are free."""
    held: list[IO[str]] = []
    try:
        for suffix in (".lock", ".start"):
            path = base.with_name(base.name + suffix)
            if not path.exists():
                continue
            handle = open(path, "a")  # noqa: SIM115 - closed below
            held.append(handle)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
        yield True
    finally:
        for lock in held:
            lock.close()
