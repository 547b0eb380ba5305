"""``fleetbus tail``: the fleet's traffic, live, one line per event.

Like ``mosquitto_sub -v`` for claims and facts: local time, repository, the
session's name, what happened, the scopes and the intent or the fact's text.
``--since`` replays the retained history first (the current claim table and
the facts changed since), then follows without a gap or a repeat.
"""

from __future__ import annotations

import argparse
import select
import sys
from typing import Any, TextIO

import orjson

from fleetbus.errors import BadInput, FleetbusError
from fleetbus.facts import KINDS
from fleetbus.ops import render
from fleetbus.ops.link import Link, resolve_url
from fleetbus.ops.watch import Line, Watcher, parse_since, scopes_overlap
from fleetbus.repo import RepoInfo, discover, resolve_scope
from fleetbus.scope import Scope, parse_scope

POLL_S = 1.0
NAME_WIDTH = 14
VERB_WIDTH = len("claimed (shared)")
KIND_NAMES = frozenset(
    {
        *("session", "claim", "wait", "fact", "notice"),
        *("session.joined", "session.left", "session.lost"),
        *("claim.granted", "claim.released", "claim.renewed"),
        *("wait.queued", "wait.ended", "fact.published", "fact.ended"),
        "fact.dropped",
        *("joined", "left", "lost", "claimed", "holds", "released", "expired"),
        *("renewed", "waits", "stops", "dropped", "superseded", "retracted"),
        *KINDS,
    }
)
"""Every name ``--kind`` takes: families, types, verbs and kinds of facts."""


def target_repo(args: argparse.Namespace) -> tuple[str | None, RepoInfo | None]:
    """The repository id to watch (``None``: all) and, if local, its checkout."""
    if getattr(args, "all_repos", False):
        return None, None
    given = getattr(args, "repo", None)
    if given and given.startswith(("git:", "path:")):
        return given, None
    info = discover(given)
    return info.id, info


def wanted_scopes(texts: list[str], info: RepoInfo | None) -> list[Scope]:
    """The scope filter, resolved like a claim's scopes when in a checkout."""
    return [resolve_scope(t, info) if info else parse_scope(t) for t in texts]


class Filter:
    """Which lines to show: by kind, session and overlapping scope.

    A kind is an event's type, its family, its verb or tone, or the kind of
    the fact it concerns (``gotcha``: such facts published and ended).
    """

    def __init__(
        self,
        kinds: list[str] | None,
        sessions: list[str] | None,
        scopes: list[Scope],
    ) -> None:
        self.kinds = {
            k.strip() for raw in kinds or [] for k in raw.split(",") if k.strip()
        }
        unknown = sorted(self.kinds - KIND_NAMES)
        if unknown:
            raise BadInput(
                f"--kind {unknown[0]!r} names no kind of event; "
                f"known: {', '.join(sorted(KIND_NAMES))}"
            )
        self.sessions = set(sessions or [])
        self.scopes = scopes

    def admits(self, line: Line) -> bool:
        """Whether ``line`` passes every filter given (notices always do)."""
        if line.kind == "notice":
            return True
        if self.kinds and not self.kinds & {
            line.kind,
            line.kind.partition(".")[0],
            line.verb.partition(" ")[0],
            line.tone,
            *fact_kinds(line.event),
        }:
            return False
        if self.sessions and not self.sessions & {line.sid, line.name}:
            return False
        return not self.scopes or scopes_overlap(line, self.scopes)


def fact_kinds(event: dict[str, Any]) -> set[str]:
    """The kinds of the facts a fact event concerns, as far as it says."""
    facts = [event.get("fact"), *(event.get("facts") or [])]
    kinds = {str(fact.get("kind")) for fact in facts if isinstance(fact, dict)}
    kinds.update(str(kind) for kind in event.get("kinds") or ())
    return kinds


def format_line(line: Line, *, colour: bool) -> str:
    """The human form of one line."""
    scopes = ", ".join(line.scopes)
    verb = render.paint(line.verb.ljust(VERB_WIDTH), line.tone, colour)
    parts = [
        render.clock(line.at),
        render.short_repo(line.repo).ljust(7),
        render.clip(line.name, NAME_WIDTH).ljust(NAME_WIDTH),
        verb,
    ]
    if scopes:
        parts.append(scopes)
    if line.text:
        parts.append(f"— {render.clip(line.text, 200)}" if scopes else line.text)
    return "  ".join(parts).rstrip()


def json_line(line: Line) -> bytes:
    """The JSON form: the event as the broker sent it, plus who and which scopes."""
    body: dict[str, Any] = {**line.event, "who": line.name, "scopes": line.scopes}
    return orjson.dumps(body)


def emit(line: Line, out: TextIO, *, as_json: bool, colour: bool) -> None:
    """Write one line and flush it, so that a pipe sees it at once."""
    if as_json:
        out.write(json_line(line).decode() + "\n")
    else:
        out.write(format_line(line, colour=colour) + "\n")
    out.flush()


def reader_gone(stream: TextIO) -> bool:
    """Whether ``stream`` is a pipe whose reader has gone (``| head`` ended).

    A write would fail, but a quiet fleet may not write for hours: polling the
    descriptor for an error lets tail end as soon as its reader does.
    """
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


def _point_at_busy_repos(repo: str | None, active: dict[str, Any]) -> None:
    """Say so on stderr when ``repo`` is idle but others are not.

    Run outside the repository the fleet works on, tail would otherwise wait
    in silence.
    """
    busy = [r for r, n in active.items() if n.get("sessions") or n.get("claims")]
    if repo is None or not busy or repo in busy:
        return
    sys.stderr.write(
        f"fleetbus tail: {repo} has no sessions now; "
        f"--all-repos follows the {len(busy)} that have\n"
    )
    sys.stderr.flush()


def run(args: argparse.Namespace) -> int:
    """Follow the events until interrupted; returns the exit code."""
    since = parse_since(args.since) if args.since else None
    repo, info = target_repo(args)
    try:
        scopes = wanted_scopes(args.scopes, info)
    except FleetbusError as exc:
        raise BadInput(f"bad scope filter: {exc.message}") from exc
    chosen = Filter(args.kind, args.session, scopes)
    out = sys.stdout
    colour = not args.json and render.use_colour(out)
    with Link(resolve_url(args.url), timeout=args.timeout) as link:
        watcher = Watcher(link, repo)
        lines = watcher.start(since)
        _point_at_busy_repos(repo, watcher.active)
        for line in (line for line in lines if line.replay):
            if chosen.admits(line):
                emit(line, out, as_json=args.json, colour=colour)
        if since is not None and not args.json:
            out.write(render.paint("-- live --", "notice", colour) + "\n")
            out.flush()
        for line in (line for line in lines if not line.replay):
            if chosen.admits(line):
                emit(line, out, as_json=args.json, colour=colour)
        while True:
            for line in watcher.poll(POLL_S):
                if chosen.admits(line):
                    emit(line, out, as_json=args.json, colour=colour)
            if reader_gone(out):
                raise BrokenPipeError
