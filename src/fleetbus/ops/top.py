"""``fleetbus top``: a live board of the fleet in the terminal.

Who holds what, who waits behind whom, the sessions, the facts as they arrive
and the rate of events, redrawn as events come in. ``q`` quits. The board is
built by :class:`Board` as plain lines, so it can be checked without a
terminal; :func:`run` only draws them with curses.
"""

from __future__ import annotations

import argparse
import curses
import sys
import time
from collections import deque
from typing import Any

from fleetbus.errors import BadInput
from fleetbus.ops import render
from fleetbus.ops.link import Link, resolve_url
from fleetbus.ops.tail import format_line, target_repo
from fleetbus.ops.watch import Line, RepoState, Since, Watcher, blockers

RATE_WINDOW_S = 10.0
RECENT_FACTS = 50
RECENT_EVENTS = 200
QUIT_KEYS = frozenset({ord("q"), ord("Q")})


class Board:
    """The state shown on the board, fed with the watcher's lines."""

    def __init__(self, watcher: Watcher, broker: dict[str, Any]) -> None:
        self.watcher = watcher
        self.broker = broker
        self.facts: deque[Line] = deque(maxlen=RECENT_FACTS)
        self.events: deque[Line] = deque(maxlen=RECENT_EVENTS)
        self.arrivals: deque[float] = deque()
        self.total = 0

    def feed(self, lines: list[Line], now: float) -> None:
        """Take new lines: facts and events for their panels, times for the rate."""
        for line in lines:
            if line.tone == "fact" and line.kind == "fact.published":
                self.facts.append(line)
            if not line.replay:
                self.events.append(line)
                self.arrivals.append(now)
                self.total += 1
        while self.arrivals and self.arrivals[0] < now - RATE_WINDOW_S:
            self.arrivals.popleft()

    def rate(self) -> float:
        """Events per second over the last few seconds."""
        return len(self.arrivals) / RATE_WINDOW_S

    def render(self, width: int, height: int, now: float) -> list[str]:
        """The board as at most ``height`` lines of at most ``width`` characters."""
        repos = self.watcher.repos
        many = len(repos) > 1
        holders: list[str] = []
        waiting: list[str] = []
        sessions: list[str] = []
        for repo, state in sorted(repos.items()):
            prefix = f"{render.short_repo(repo)} " if many else ""
            holders.extend(prefix + row for row in _holders(state, now, width))
            waiting.extend(prefix + row for row in _waiting(state, now))
            sessions.extend(prefix + info.name for info in state.view.sessions.values())
        header = (
            f"fleetbus top  {self.broker.get('url')}  epoch {self.broker.get('epoch')}"
            f"  {time.strftime('%H:%M:%S', time.localtime(now))}"
            f"  {self.rate():.1f} events/s  ({self.total} seen)"
        )
        out = [header, ""]
        out += [f"HOLDERS ({len(holders)})", *(holders or ["  nobody holds a claim"])]
        out += ["", f"WAITING ({len(waiting)})", *(waiting or ["  nobody waits"])]
        out += ["", f"SESSIONS ({len(sessions)})", "  " + ("  ".join(sessions) or "-")]
        out += ["", "FACTS"]
        out += [_fact(line) for line in reversed(self.facts)] or ["  none yet"]
        room = height - len(out) - 3
        if room > 0:
            out += ["", "EVENTS"]
            recent = list(self.events)[-room:]
            out += ["  " + format_line(line, colour=False) for line in recent]
        out = out[: max(0, height - 1)]
        out.append("q quits")
        return [render.fit(line, width - 1) for line in out]


def _holders(state: RepoState, now: float, width: int) -> list[str]:
    grants: dict[str, list[Any]] = {}
    for row in state.view.claims():
        grants.setdefault(row.grant, []).append(row)
    rows = []
    for held in grants.values():
        first = held[0]
        scopes = ", ".join(row.scope.text for row in held)
        mode = " (shared)" if first.mode == "shared" else ""
        rows.append(
            (
                first.name,
                scopes + mode,
                render.age(now - first.since),
                render.expiry(first.expires, now),
                first.intent,
            )
        )
    return ["  " + line for line in render.table(("", "", "", "", ""), rows)[1:]]


def _waiting(state: RepoState, now: float) -> list[str]:
    rows = []
    for waiter in state.view.waiters:
        name = state.names.get(waiter.sid, waiter.sid)
        behind = blockers(state, waiter.to_wire())
        scopes = ", ".join(scope.text for scope in waiter.scopes)
        rows.append(
            (
                name,
                scopes,
                f"behind {', '.join(behind) or '?'}",
                render.age(now - waiter.since),
            )
        )
    return ["  " + line for line in render.table(("", "", "", ""), rows)[1:]]


def _fact(line: Line) -> str:
    topics = ", ".join(line.scopes)
    when = render.clock(line.at)
    return f"  {when}  {line.verb:<8} {line.name:<10} {topics}  {line.text}"


def _draw(screen: Any, lines: list[str]) -> None:
    screen.erase()
    height, width = screen.getmaxyx()
    for y, text in enumerate(lines[:height]):
        attr = curses.A_BOLD if y == 0 or (text.isupper() and text[:1].isalpha()) else 0
        try:
            screen.addnstr(y, 0, text, max(0, width - 1), attr)
        except curses.error:
            pass
    screen.refresh()


def _loop(screen: Any, board: Board, interval: float) -> None:
    screen.nodelay(True)
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    while True:
        height, width = screen.getmaxyx()
        _draw(screen, board.render(width, height, time.time()))
        key = screen.getch()
        while key != -1:
            if key in QUIT_KEYS:
                return
            key = screen.getch()
        board.feed(board.watcher.poll(interval), time.time())


def run(args: argparse.Namespace) -> int:
    """Show the board until ``q``; returns the exit code."""
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise BadInput(
            "top draws on a terminal; elsewhere use fleetbus status or fleetbus tail"
        )
    repo, _info = target_repo(args)
    with Link(resolve_url(args.url), timeout=args.timeout) as link:
        broker = link.request("status")
        watcher = Watcher(link, repo)
        board = Board(watcher, {**broker, "url": link.url})
        recent = Since(wall=time.time() - 3600)
        board.feed(watcher.start(recent), time.time())
        try:
            curses.wrapper(_loop, board, args.interval)
        except curses.error as exc:
            raise BadInput(f"top cannot draw on this terminal: {exc}") from exc
    return 0
