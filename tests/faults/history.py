"""A history of operations: each one invoked, then ok, failed or unknown.

Every worker process appends JSON lines to its own file; times are
``time.monotonic()``, which on Linux is one clock for every process of the
machine, so histories of several processes merge into one timeline.

An operation that was invoked and never completed (its process was killed)
counts as *unknown*: it may or may not have taken effect.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

INVOKE = "invoke"
OK = "ok"
FAIL = "fail"
UNKNOWN = "unknown"


@dataclass(slots=True)
class Op:
    """One operation of one process, from invocation to its completion."""

    process: str
    index: int
    op: str
    args: dict[str, Any]
    invoked: float
    completed: float | None = None
    outcome: str = UNKNOWN
    value: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the broker acknowledged the operation."""
        return self.outcome == OK

    @property
    def end(self) -> float:
        """When it completed; an unknown operation never did."""
        return self.completed if self.completed is not None else float("inf")


class Recorder:
    """Appends one process's history to a JSON-lines file, flushed per line."""

    def __init__(self, path: Path, process: str) -> None:
        self.process = process
        self._file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._count = 0

    def invoke(self, op: str, **args: Any) -> int:
        """Record that ``op`` starts; returns its index for the completion."""
        self._count += 1
        self._write(INVOKE, self._count, op=op, args=args)
        return self._count

    def ok(self, index: int, **value: Any) -> None:
        """Record that operation ``index`` succeeded with ``value``."""
        self._write(OK, index, value=value)

    def fail(self, index: int, error: str) -> None:
        """Record that operation ``index`` was refused and changed nothing."""
        self._write(FAIL, index, error=error)

    def unknown(self, index: int, error: str) -> None:
        """Record that operation ``index`` may or may not have taken effect."""
        self._write(UNKNOWN, index, error=error)

    def note(self, what: str, **fields: Any) -> None:
        """Record something that is not an operation (a phase, a dump)."""
        self._write("note", 0, what=what, **fields)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def _write(self, kind: str, index: int, **fields: Any) -> None:
        line = {
            "t": time.monotonic(),
            "p": self.process,
            "kind": kind,
            "i": index,
            **fields,
        }
        self._file.write(orjson.dumps(line).decode() + "\n")
        self._file.flush()


def read_lines(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Every well-formed line of the files; a torn last line is skipped."""
    for path in paths:
        if not path.exists():
            continue
        for raw in path.read_bytes().splitlines():
            try:
                yield orjson.loads(raw)
            except orjson.JSONDecodeError:
                continue


def load(paths: Iterable[Path]) -> list[Op]:
    """The operations of the histories in ``paths``, in order of invocation."""
    ops: dict[tuple[str, int], Op] = {}
    for line in read_lines(paths):
        kind = line["kind"]
        key = (line["p"], line["i"])
        if kind == INVOKE:
            ops[key] = Op(line["p"], line["i"], line["op"], line["args"], line["t"])
        elif kind in (OK, FAIL, UNKNOWN) and key in ops:
            op = ops[key]
            op.outcome = kind
            op.completed = line["t"] if kind != UNKNOWN else None
            op.value = line.get("value") or {}
            op.error = line.get("error")
    return sorted(ops.values(), key=lambda o: o.invoked)


def summary(ops: Iterable[Op]) -> dict[str, int]:
    """How many operations ended each way, and how many of each kind were ok."""
    counts: dict[str, int] = {}
    for op in ops:
        counts[op.outcome] = counts.get(op.outcome, 0) + 1
        if op.ok:
            counts[f"ok.{op.op}"] = counts.get(f"ok.{op.op}", 0) + 1
    return counts
