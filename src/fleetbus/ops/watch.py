"""Following a fleet's events from outside it, with retained history first.

:class:`Watcher` subscribes to the claims and facts streams of one repository
(or of all), then asks for the current claim table and the retained facts, and
hands out one ordered series: the history as synthetic events (marked
``"replay": true``), then live events. Live events the history already covers
are dropped by their ``seq``; a missed one (its ``prev`` does not link, or a
heartbeat names a later head, or the broker restarted) is reported as a
``notice`` and the table is fetched again. Facts streams are many, so a lost
fact event is found another way: when a heartbeat's ``facts`` (the seq of
the repository's last fact event) passes what the watcher has fetched up to,
it asks for the facts changed since and shows those it has not shown.

Each event comes out as a :class:`Line`: the event plus what a reader needs to
make sense of it (the session's name, the scopes it concerns, a verb), worked
out when it arrived, before the watcher's copy of the table changed.
"""

from __future__ import annotations

import time
from argparse import ArgumentTypeError
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from fleetbus.claims import ClaimView, Waiter
from fleetbus.cli_facts import parse_since as parse_when
from fleetbus.errors import BadInput, FleetbusError, ProtocolError
from fleetbus.ops.link import Link, repo_topics
from fleetbus.scope import Scope, parse_scope

FACTS_PAGE = 10_000
FACTS_MEMORY = 65_536
SETTLE_S = 1.5
_MISSED = "missed claims events after seq {}; table fetched again"
_RELEASE_VERBS = {
    "released": ("released", ""),
    "session_left": ("released", "session left"),
    "session_lost": ("expired", "session lost"),
    "ttl_expired": ("expired", "ttl ran out"),
    "forced": ("released", "forced"),
}


@dataclass(frozen=True, slots=True)
class Since:
    """Where a replay starts: after a ``seq``, or at a wall time."""

    seq: int | None = None
    wall: float | None = None

    def admits(self, seq: int | None, wall: float | None) -> bool:
        """Whether something numbered ``seq``, dated ``wall``, is in the replay."""
        if self.wall is not None:
            return wall is not None and wall >= self.wall
        if seq is None:
            return self.seq == 0
        return seq > (self.seq or 0)


def parse_since(text: str, now: float | None = None) -> Since:
    """A ``seq`` (``120``), a duration back from now (``10m``, ``1h30m``) or an
    ISO time: what ``fleetbus facts --since`` takes."""
    try:
        when = parse_when(text, now)
    except ArgumentTypeError:
        raise BadInput(
            f"--since takes a seq, a duration (10m, 2h) or an ISO time, not {text!r}"
        ) from None
    return Since(seq=when) if isinstance(when, int) else Since(wall=when)


@dataclass(slots=True)
class Line:
    """One event as a reader sees it."""

    event: dict[str, Any]
    repo: str
    at: float | None
    sid: str | None
    name: str
    verb: str
    tone: str
    scopes: list[str]
    text: str
    replay: bool = False

    @property
    def kind(self) -> str:
        """The event's type (``claim.granted``, ``notice``…)."""
        return str(self.event.get("type", ""))


@dataclass(slots=True)
class RepoState:
    """The watcher's copy of one repository: claim table, names, heads."""

    view: ClaimView = field(default_factory=ClaimView)
    names: dict[str, str] = field(default_factory=dict)
    claims_head: int = 0
    facts_seq: int = 0
    epoch: int | None = None
    facts_synced: int | None = None
    """Every fact event up to this ``seq`` has arrived or been fetched."""
    facts_shown: OrderedDict[int, None] = field(default_factory=OrderedDict)
    """The ``seq`` of fact events shown lately, so a fetch repeats none."""

    def show_fact(self, seq: int) -> bool:
        """Record fact event ``seq`` as shown; False if it was, or is replayed."""
        if seq <= self.facts_seq or seq in self.facts_shown:
            return False
        self.facts_shown[seq] = None
        while len(self.facts_shown) > FACTS_MEMORY:
            self.facts_shown.popitem(last=False)
        return True


class Watcher:
    """Follow ``repo`` (``None``: every repository) at the broker of ``link``."""

    def __init__(self, link: Link, repo: str | None) -> None:
        self.link = link
        self.repo = repo
        self.repos: dict[str, RepoState] = {}
        self.facts_supported = True
        self.active: dict[str, Any] = {}
        """The broker's figures per repository when :meth:`start` ran."""

    def start(self, since: Since | None) -> list[Line]:
        """Subscribe, load the state, and return the replay (empty without ``since``).

        Events that arrived meanwhile follow the replay in the same list.
        """
        self.link.subscribe(repo_topics(self.repo))
        active = self.active = self.link.request("status").get("repos", {})
        wanted = [self.repo] if self.repo is not None else sorted(active)
        early: list[tuple[bytes, dict[str, Any]]] = []
        if since is not None and any(
            active.get(repo, {}).get("sessions") for repo in wanted
        ):
            early = self._settle()
        lines: list[Line] = []
        for repo in wanted:
            state = self._load(repo)
            if since is not None:
                lines.extend(self._replay(repo, state, since))
        # In the order things happened: joins, waits and grants carry no seq.
        lines.sort(key=lambda line: (line.at or 0.0, line.event.get("seq") or 0))
        for topic, event in early + self.link.events(0):
            lines.extend(self._take(topic, event))
        return lines

    def _settle(self) -> list[tuple[bytes, dict[str, Any]]]:
        """Wait for the first event, which proves the subscription is in place.

        A subscription reaches the broker a moment after it is made; events
        published before then never arrive. Waiting for one (the broker's
        heartbeat comes every second to a repository with sessions) before
        loading the state leaves no window in which a change could be lost.
        """
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline:
            got = self.link.events(deadline - time.monotonic())
            if got:
                return got
        return []

    def poll(self, timeout: float) -> list[Line]:
        """The live events that arrive within ``timeout`` seconds, described."""
        lines: list[Line] = []
        for topic, event in self.link.events(timeout):
            lines.extend(self._take(topic, event))
        return lines

    # -- loading and replaying --------------------------------------------------

    def _load(self, repo: str) -> RepoState:
        snapshot = self.link.request("snapshot", repo=repo)
        state = self.repos.setdefault(repo, RepoState())
        state.view.load(snapshot)
        state.claims_head = int(snapshot.get("head", 0))
        state.epoch = snapshot.get("epoch")
        if state.facts_synced is None:
            state.facts_synced = int(snapshot.get("seq", 0))
        for info in state.view.sessions.values():
            state.names[info.sid] = info.name
        for row in state.view.claims():
            state.names.setdefault(row.sid, row.name)
        return state

    def _facts(self, repo: str, since: Since) -> tuple[list[dict[str, Any]], int]:
        if not self.facts_supported:
            return [], 0
        query: dict[str, Any] = {"repo": repo, "include_history": True}
        if since.wall is not None:
            query["since_time"] = since.wall
        else:
            query["changed_since"] = since.seq or 0
        try:
            reply = self.link.request("facts", limit=FACTS_PAGE, **query)
        except ProtocolError:
            self.facts_supported = False
            return [], 0
        return list(reply.get("facts", [])), int(reply.get("seq", 0))

    def _replay(self, repo: str, state: RepoState, since: Since) -> list[Line]:
        facts, facts_seq = self._facts(repo, since)
        state.facts_seq = max(state.facts_seq, facts_seq)
        state.facts_synced = max(state.facts_synced or 0, facts_seq)
        events: list[dict[str, Any]] = []
        for info in state.view.sessions.values():
            if since.admits(None, info.joined):
                events.append(
                    {
                        "type": "session.joined",
                        "session": info.to_wire(),
                        "at": info.joined,
                    }
                )
        grants: dict[str, list[dict[str, Any]]] = {}
        for row in state.view.claims():
            if since.admits(row.fence, row.since):
                grants.setdefault(row.grant, []).append(row.to_wire())
        for grant, rows in grants.items():
            first = rows[0]
            events.append(
                {
                    "type": "claim.granted",
                    "sid": first["sid"],
                    "grant": grant,
                    "fence": first["fence"],
                    "claims": rows,
                    "seq": first["fence"],
                    "at": first["since"],
                }
            )
        for waiter in state.view.waiters:
            if since.admits(None, waiter.since):
                events.append(
                    {"type": "wait.queued", **waiter.to_wire(), "at": waiter.since}
                )
        for fact in facts:
            events.extend(_fact_history(fact, since))
        lines = []
        for event in events:
            event["repo"] = repo
            event["replay"] = True
            lines.append(self._describe(repo, state, event, replay=True))
        return lines

    # -- live events ------------------------------------------------------------

    def _take(self, topic: bytes, event: dict[str, Any]) -> list[Line]:
        repo = event.get("repo")
        if not isinstance(repo, str):
            return []
        state = self.repos.get(repo)
        if state is None:
            state = self.repos[repo] = RepoState()
        if topic[:1] == b"f":
            return self._take_fact(repo, state, event)
        if event.get("type") == "heartbeat":
            return self._heartbeat(repo, state, event)
        seq = event.get("seq")
        if not isinstance(seq, int) or seq <= state.claims_head:
            return []
        if event.get("prev") != state.claims_head:
            lines = [
                self._notice(
                    repo,
                    _MISSED.format(state.claims_head),
                )
            ]
            self._load(repo)
            if seq <= state.claims_head:
                return lines
            return lines + self._apply(repo, state, event)
        return self._apply(repo, state, event)

    def _take_fact(
        self, repo: str, state: RepoState, event: dict[str, Any]
    ) -> list[Line]:
        seq = event.get("seq")
        if not isinstance(seq, int) or not state.show_fact(seq):
            return []
        return [self._describe(repo, state, event)]

    def _fetch_facts(self, repo: str, state: RepoState, seq: int) -> list[Line]:
        """Show the fact events after ``facts_synced`` that never arrived."""
        if state.facts_synced is None or seq <= state.facts_synced:
            state.facts_synced = max(seq, state.facts_synced or 0)
            return []
        since = Since(seq=state.facts_synced)
        facts, at = self._facts(repo, since)
        if len(facts) >= FACTS_PAGE:
            at = int(facts[-1]["changed"])
        state.facts_synced = max(state.facts_synced, at)
        events = [event for fact in facts for event in _fact_history(fact, since)]
        lines = []
        for event in sorted(events, key=lambda event: int(event["seq"])):
            if state.show_fact(int(event["seq"])):
                event["repo"] = repo
                lines.append(self._describe(repo, state, event))
        return lines

    def _heartbeat(
        self, repo: str, state: RepoState, event: dict[str, Any]
    ) -> list[Line]:
        epoch = event.get("epoch")
        head = event.get("head")
        if state.epoch is not None and epoch != state.epoch:
            self._load(repo)
            return [self._notice(repo, f"broker restarted (epoch {epoch})")]
        if isinstance(head, int) and head > state.claims_head:
            before = state.claims_head
            self._load(repo)
            return [
                self._notice(
                    repo,
                    _MISSED.format(before),
                )
            ]
        seq = event.get("facts", event.get("seq"))
        return self._fetch_facts(repo, state, seq) if isinstance(seq, int) else []

    def _apply(self, repo: str, state: RepoState, event: dict[str, Any]) -> list[Line]:
        line = self._describe(repo, state, event)
        try:
            state.view.apply(event)
        except FleetbusError:
            return [line, self._notice(repo, f"could not apply {line.kind}")]
        state.claims_head = int(event["seq"])
        if event.get("type") == "session.joined":
            state.names[line.sid or ""] = line.name
        return [line]

    def _notice(self, repo: str, text: str) -> Line:
        now = time.time()
        event = {"type": "notice", "repo": repo, "text": text, "at": now}
        return Line(event, repo, now, None, "fleetbus", "notice", "notice", [], text)

    # -- describing -------------------------------------------------------------

    def _describe(
        self,
        repo: str,
        state: RepoState,
        event: dict[str, Any],
        *,
        replay: bool = False,
    ) -> Line:
        kind = str(event.get("type", ""))
        at = event.get("at")
        sid = event.get("sid")
        line = Line(
            event,
            repo,
            at if isinstance(at, float | int) else None,
            sid,
            "",
            kind,
            kind.partition(".")[0],
            [],
            "",
            replay,
        )
        describe = _DESCRIBERS.get(kind)
        if describe is not None:
            describe(line, state, event)
        if not line.name:
            line.name = state.names.get(line.sid or "", line.sid or "-")
        return line


def _fact_history(fact: dict[str, Any], since: Since) -> list[dict[str, Any]]:
    events = []
    if since.admits(fact.get("seq"), fact.get("at")):
        events.append(
            {
                "type": "fact.published",
                "seq": fact["seq"],
                "fact": fact,
                "at": fact.get("at"),
            }
        )
    changed = fact.get("changed")
    ended = fact.get("state", "live") != "live" and changed != fact.get("seq")
    if ended and since.admits(changed, fact.get("ended_at")):
        events.append(
            {
                "type": "fact.ended",
                "seq": changed,
                "reason": fact["state"],
                "ids": [fact["id"]],
                "facts": [fact],
                "at": fact.get("ended_at"),
            }
        )
    return events


def _joined(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    session = event.get("session") or {}
    meta = session.get("meta") or {}
    line.sid = session.get("sid")
    line.name = str(session.get("name", line.sid))
    line.verb = "joined"
    branch = f" ({meta['branch']})" if meta.get("branch") else ""
    line.text = f"{meta.get('host', '?')}:{meta.get('worktree', '?')}{branch}"


def _left(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    line.verb = "left" if event.get("type") == "session.left" else "lost"
    if line.verb == "lost":
        line.tone = "lost"
        line.text = str(event.get("reason", ""))


def _granted(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    rows = event.get("claims") or []
    line.tone = "claimed"
    line.verb = "holds" if line.replay else "claimed"
    if rows and rows[0].get("mode") == "shared":
        line.verb += " (shared)"
    line.scopes = [str(row.get("scope")) for row in rows]
    if rows:
        line.name = str(rows[0].get("name", ""))
        line.text = str(rows[0].get("intent", ""))


def _released(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    verb, why = _RELEASE_VERBS.get(str(event.get("reason")), ("released", ""))
    line.verb = line.tone = verb
    line.text = why
    line.scopes = _scopes_of(state, event.get("ids") or [])


def _renewed(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    from fleetbus.ops.render import stamp

    line.verb = line.tone = "renewed"
    line.scopes = _scopes_of(state, event.get("ids") or [])
    line.text = f"until {stamp(event.get('expires'))}"


def _queued(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    line.verb = line.tone = "waits"
    line.scopes = [str(s) for s in event.get("scopes") or []]
    behind = blockers(state, event)
    intent = str(event.get("intent", ""))
    line.text = f"{intent} (behind {', '.join(behind)})" if behind else intent


def _wait_ended(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    line.tone = "wait"
    line.verb = "stops waiting"
    waiter = state.view.waiter(str(event.get("sid")), str(event.get("rid")))
    if waiter is not None:
        line.scopes = [scope.text for scope in waiter.scopes]
    line.text = str(event.get("reason", ""))


def _fact(line: Line, state: RepoState, event: dict[str, Any]) -> None:
    kind = event.get("type")
    facts = [event["fact"]] if kind == "fact.published" else event.get("facts") or []
    line.tone = "fact"
    if kind == "fact.dropped":
        line.verb = "dropped"
        line.text = f"{len(event.get('ids') or [])} fact(s), retention"
        return
    first = facts[0] if facts else {}
    line.sid = first.get("sid")
    line.name = str(first.get("name", ""))
    line.scopes = [str(t) for t in first.get("topics") or []]
    line.text = str(first.get("body", ""))
    line.verb = (
        str(first.get("kind")) if kind == "fact.published" else str(event.get("reason"))
    )


_DESCRIBERS = {
    "session.joined": _joined,
    "session.left": _left,
    "session.lost": _left,
    "claim.granted": _granted,
    "claim.released": _released,
    "claim.renewed": _renewed,
    "wait.queued": _queued,
    "wait.ended": _wait_ended,
    "fact.published": _fact,
    "fact.ended": _fact,
    "fact.dropped": _fact,
}


def _scopes_of(state: RepoState, ids: list[str]) -> list[str]:
    rows = (state.view.get(str(i)) for i in ids)
    return list(dict.fromkeys(row.scope.text for row in rows if row is not None))


def blockers(state: RepoState, event: dict[str, Any]) -> list[str]:
    """The names of the sessions whose claims a queued request waits behind."""
    try:
        waiter = Waiter.from_wire(event)
    except ProtocolError:
        return []
    rows = state.view.conflicts(waiter.scopes, waiter.mode, waiter.sid)
    return list(dict.fromkeys(row.name for row in rows))


def scopes_overlap(line: Line, wanted: list[Scope]) -> bool:
    """Whether one of the line's scopes overlaps one of ``wanted``."""
    for text in line.scopes:
        try:
            scope = parse_scope(text)
        except FleetbusError:
            continue
        if any(scope.overlaps(other) for other in wanted):
            return True
    return False
