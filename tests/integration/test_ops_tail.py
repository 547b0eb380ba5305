"""``fleetbus tail``: lines and JSON, filters, replay then follow, broken pipes."""

from __future__ import annotations

import io
import itertools
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import pytest

from fleetbus.client import Session, connect
from fleetbus.errors import BadInput
from fleetbus.ops.render import use_colour
from fleetbus.ops.tail import Filter, format_line
from fleetbus.ops.watch import Line, Since, parse_since
from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")
DEADLINE_S = 15.0


class Reader:
    """The stdout of a child, line by line, read on a thread."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def next(self, timeout: float = DEADLINE_S) -> str:
        """The next line; fails the test if none comes in time."""
        line = self.lines.get(timeout=timeout)
        assert line is not None, "the command ended early"
        return line

    def until(self, predicate: Any, timeout: float = DEADLINE_S) -> list[str]:
        """Lines up to and including the first for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            line = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(line)
            if predicate(line):
                return seen


@pytest.fixture
def tail(broker: BrokerProcess, short_tmp: Path) -> Iterator[Any]:
    """Start ``fleetbus tail`` in the test's repository; every child is reaped."""
    children: list[subprocess.Popen[str]] = []

    def start(*args: str) -> Reader:
        proc = subprocess.Popen(
            [FLEETBUS, "tail", "--url", broker.url, *args],
            cwd=short_tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "NO_COLOR": "1"},
        )
        children.append(proc)
        return Reader(proc.stdout)  # type: ignore[arg-type]

    yield start
    for proc in children:
        proc.terminate()
        proc.wait(10)


def join(broker: BrokerProcess, repo: Path, name: str) -> Session:
    return connect(broker.url, repo=repo, name=name, session_id=f"t-{name}")


def test_human_lines_show_time_repo_name_verb_scope_and_intent(
    broker: BrokerProcess, short_tmp: Path, tail: Any
) -> None:
    """A live claim is one readable line; the replay ends with a marker."""
    with join(broker, short_tmp, "alice") as alice:
        out = tail("--since", "0")
        replay = out.until(lambda line: line == "-- live --")
        alice.claim("src/auth/", intent="rework login")
        line = out.until(lambda line: "claimed" in line)[-1]

    assert any("alice" in r and "joined" in r for r in replay)
    fields = line.split()
    assert len(fields[0]) == 8
    assert fields[0].count(":") == 2
    assert fields[1] == short_tmp.name or fields[1].startswith(short_tmp.name[:7])
    assert fields[2:5] == ["alice", "claimed", "src/auth/"]
    assert line.endswith("— rework login")


def test_replay_is_in_the_order_things_happened(
    broker: BrokerProcess, short_tmp: Path, tail: Any
) -> None:
    """Joins, then the holder's grant, then the request waiting behind it."""
    with (
        join(broker, short_tmp, "alice") as alice,
        join(broker, short_tmp, "bob") as bob,
    ):
        alice.claim("src/auth/", intent="rework login")
        queued = threading.Event()
        bob.on_event(lambda e: queued.set() if e["type"] == "wait.queued" else None)
        waiter = threading.Thread(
            target=bob.claim, args=("src/auth/x.py",), kwargs={"wait": 30}, daemon=True
        )
        waiter.start()
        assert queued.wait(DEADLINE_S)
        replay = tail("--since", "0").until(lambda line: line == "-- live --")
        alice.release(all=True)
        waiter.join(DEADLINE_S)

    verbs = [line.split()[3] for line in replay[:-1]]
    assert verbs == ["joined", "joined", "holds", "waits"]


def wait_ready(out: Reader, session: Session) -> None:
    """Claim ``src/ready.py`` until tail shows it: then it is subscribed."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        grant = session.claim("src/ready.py")
        session.release(grant=grant.id)
        try:
            out.next(timeout=0.2)
            return
        except queue.Empty:
            continue
    raise AssertionError("tail showed nothing")


def test_json_lines_carry_the_event_and_filters_apply(
    broker: BrokerProcess, short_tmp: Path, tail: Any
) -> None:
    """``--json`` with kind, session and scope filters shows alice's claims only."""
    with (
        join(broker, short_tmp, "alice") as alice,
        join(broker, short_tmp, "bob") as bob,
    ):
        out = tail("--json", "--kind", "claim", "--session", "alice", "src/")
        wait_ready(out, alice)
        bob.claim("src/bob.py")
        alice.claim("docs/")
        alice.claim("src/a.py", intent="fix")
        alice.release("src/a.py")
        events: list[dict[str, Any]] = []
        while len(events) < 2:
            event = orjson.loads(out.next())
            if event["scopes"] != ["src/ready.py"]:
                events.append(event)

    assert [e["type"] for e in events] == ["claim.granted", "claim.released"]
    assert events[0]["who"] == "alice"
    assert events[0]["scopes"] == ["src/a.py"]
    assert events[0]["claims"][0]["intent"] == "fix"
    assert events[1]["scopes"] == ["src/a.py"]
    assert events[1]["reason"] == "released"


def test_replay_then_follow_has_no_gap_and_no_repeat(
    broker: BrokerProcess, short_tmp: Path, tail: Any
) -> None:
    """History comes once as replay, live events follow with linked ``prev``."""
    with (
        join(broker, short_tmp, "alice") as alice,
        join(broker, short_tmp, "bob") as bob,
    ):
        alice.claim("src/a.py", intent="one")
        alice.claim("src/b.py", intent="two")
        stop = threading.Event()

        def churn() -> None:
            while not stop.is_set():
                grant = bob.claim("lib/x.py", intent="churn")
                bob.release(grant=grant.id)

        writer = threading.Thread(target=churn, daemon=True)
        writer.start()
        try:
            out = tail("--json", "--since", "0")
            events = [orjson.loads(out.next()) for _ in range(60)]
        finally:
            stop.set()
            writer.join(10)

    replay = [e for e in events if e.get("replay")]
    live = [e for e in events if not e.get("replay")]
    assert not [e for e in events if e["type"] == "notice"]
    assert {tuple(e["scopes"]) for e in replay if e["type"] == "claim.granted"} >= {
        ("src/a.py",),
        ("src/b.py",),
    }
    assert events[: len(replay)] == replay, "the replay comes first"
    seqs = [e["seq"] for e in live]
    assert len(seqs) == len(set(seqs)), "no event twice"
    assert seqs == sorted(seqs)
    for before, after in itertools.pairwise(live):
        assert after["prev"] == before["seq"], "no claims event missed"
    granted = [e["fence"] for e in replay if e["type"] == "claim.granted"]
    assert max(granted) < seqs[0]


def test_facts_are_replayed_and_followed(
    broker: BrokerProcess, short_tmp: Path, tail: Any
) -> None:
    """Retained facts come back with ``--since``; new ones arrive live, once."""
    with join(broker, short_tmp, "alice") as alice:
        alice.publish("src/auth/", text="old finding")
        out = tail("--kind", "fact", "--since", "0")
        replay = out.until(lambda line: line == "-- live --")
        alice.publish("src/auth/login.py", text="new finding")
        live = out.until(lambda line: "new finding" in line)

    assert any("note" in line and "old finding" in line for line in replay)
    assert live[-1].split()[2:5] == ["alice", "note", "src/auth/login.py"]


def test_kind_filter_takes_fact_kinds(
    broker: BrokerProcess, short_tmp: Path, tail: Any
) -> None:
    """``--kind gotcha`` shows gotchas published and ended, replayed and live,
    and no other fact or claim."""
    with join(broker, short_tmp, "alice") as alice:
        old = alice.publish("src/auth/", text="old gotcha", kind="gotcha")
        alice.publish("src/auth/", text="old note")
        alice.retract(old.id)
        out = tail("--kind", "gotcha", "--since", "0")
        replay = out.until(lambda line: line == "-- live --")
        alice.claim("src/auth/", intent="gotcha hunt")
        alice.publish("src/auth/", text="new note")
        alice.publish("src/auth/", text="new gotcha", kind="gotcha")
        live = out.until(lambda line: "new gotcha" in line)

    verbs = [line.split()[3] for line in replay[:-1] + live]
    assert verbs == ["gotcha", "retracted", "gotcha"]
    assert not [line for line in replay + live if "note" in line]


def test_kind_filter_shows_retention_drops_of_that_kind(
    broker_factory: Callable[..., BrokerProcess], short_tmp: Path
) -> None:
    """A fact dropped for retention carries its kind: ``--kind gotcha`` shows
    the drop of a gotcha, not the note that pushed it out."""
    small = broker_factory("small", extra_args=["--facts-max", "1"])
    proc = subprocess.Popen(
        [FLEETBUS, "tail", "--url", small.url, "--since", "0", "--kind", "gotcha"],
        cwd=short_tmp,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        out = Reader(proc.stdout)  # type: ignore[arg-type]
        out.until(lambda line: line == "-- live --")
        with join(small, short_tmp, "alice") as alice:
            alice.publish("src/auth/", text="mind the cache", kind="gotcha")
            alice.publish("src/auth/", text="a plain note")
            lines = out.until(lambda line: "dropped" in line)
    finally:
        proc.terminate()
        proc.wait(10)

    assert "mind the cache" in lines[0]
    assert len(lines) == 2
    assert "a plain note" not in "".join(lines)


def test_broken_pipe_ends_quietly(broker: BrokerProcess, short_tmp: Path) -> None:
    """``fleetbus tail | head -1`` exits 0 with nothing on stderr."""
    status = short_tmp / "status"
    script = (
        f'"{FLEETBUS}" tail --url {broker.url} --since 0 2>"{short_tmp}/err" '
        f'| head -1; echo "${{PIPESTATUS[0]}}" > "{status}"'
    )
    with join(broker, short_tmp, "alice") as alice:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=short_tmp,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            deadline = time.monotonic() + DEADLINE_S
            while proc.poll() is None and time.monotonic() < deadline:
                grant = alice.claim("x.py")
                alice.release(grant=grant.id)
        finally:
            proc.kill() if proc.poll() is None else None
            proc.wait(10)

    assert "alice" in first
    assert status.read_text().strip() == "0"
    assert (short_tmp / "err").read_text() == ""


def test_head_ends_tail_when_the_fleet_is_quiet(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """``tail | head -1`` ends soon after head, though no further line is written."""
    status = short_tmp / "status"
    script = (
        f'"{FLEETBUS}" tail --url {broker.url} --since 0 --json --kind joined '
        f'2>"{short_tmp}/err" | head -1; echo "${{PIPESTATUS[0]}}" > "{status}"'
    )
    with join(broker, short_tmp, "alice"):
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=short_tmp,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=DEADLINE_S)
        finally:
            os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
            proc.wait(10)

    assert orjson.loads(out)["who"] == "alice"
    assert status.read_text().strip() == "0"
    assert (short_tmp / "err").read_text() == ""


def test_ctrl_c_ends_quietly(broker: BrokerProcess, short_tmp: Path) -> None:
    """SIGINT stops tail with status 130 and no traceback."""
    with join(broker, short_tmp, "alice"):
        proc = subprocess.Popen(
            [FLEETBUS, "tail", "--url", broker.url, "--since", "0"],
            cwd=short_tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        out = Reader(proc.stdout)  # type: ignore[arg-type]
        out.until(lambda line: line.endswith("-- live --"))
        proc.send_signal(2)
        code = proc.wait(10)

    assert code == 130
    assert proc.stderr is not None
    assert proc.stderr.read() == ""


def test_idle_repository_points_at_the_busy_ones(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """Run where nobody works, tail says on stderr that elsewhere somebody does."""
    busy = short_tmp / "busy"
    busy.mkdir()
    idle = short_tmp / "idle"
    idle.mkdir()
    with join(broker, busy, "alice"):
        proc = subprocess.Popen(
            [FLEETBUS, "tail", "--url", broker.url],
            cwd=idle,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            hint = Reader(proc.stderr).next()  # type: ignore[arg-type]
        finally:
            proc.terminate()
            proc.wait(10)

    assert hint.startswith("fleetbus tail: path:")
    assert hint.endswith("has no sessions now; --all-repos follows the 1 that have")


def test_unreachable_broker_exits_3(short_tmp: Path) -> None:
    """No broker: one line on stderr, exit code 3."""
    done = subprocess.run(
        [FLEETBUS, "tail", "--url", f"ipc://{short_tmp}/none", "--all-repos"],
        capture_output=True,
        text=True,
        timeout=30,
    )

    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_verbs_are_coloured_by_kind_on_a_terminal_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An expiry is red, a grant green; no colour off a terminal or with NO_COLOR."""
    expired = Line({}, "git:0b5f63e", 0.0, "s", "bob", "expired", "expired", [], "")
    granted = Line({}, "git:0b5f63e", 0.0, "s", "bob", "claimed", "claimed", [], "")
    terminal = Terminal()
    monkeypatch.delenv("NO_COLOR", raising=False)

    assert "\x1b[31mexpired" in format_line(expired, colour=True)
    assert "\x1b[32mclaimed" in format_line(granted, colour=True)
    assert "\x1b" not in format_line(expired, colour=False)
    assert use_colour(terminal)
    assert not use_colour(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_colour(terminal)


def test_scopes_line_up_whatever_the_verb() -> None:
    """The scope column starts at one place for every verb, shared claims too."""
    verbs = ["claimed (shared)", "holds (shared)", "stops waiting", "left"]
    lines = [
        format_line(
            Line({}, "git:0b5f63e", 0.0, "s", "bob", verb, "claimed", ["src/"], ""),
            colour=False,
        )
        for verb in verbs
    ]

    assert len({line.index("src/") for line in lines}) == 1


def test_kind_filter_refuses_an_unknown_name() -> None:
    """Families, types, verbs and fact kinds pass; a typo is refused by name."""
    Filter(["claim,gotcha", "session.lost", "expired", "holds"], None, [])

    with pytest.raises(BadInput, match="'gotchas' names no kind of event; known: "):
        Filter(["gotchas"], None, [])


def test_since_takes_a_seq_a_duration_or_an_iso_time() -> None:
    """``--since`` forms: seq, ``10m``, ISO time with or without a zone."""
    assert parse_since("42") == Since(seq=42)
    assert parse_since("10m", now=1000.0) == Since(wall=400.0)
    assert parse_since("1970-01-01T00:01:40Z") == Since(wall=100.0)
    with pytest.raises(Exception, match="--since takes"):
        parse_since("yesterday")
