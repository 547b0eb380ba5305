"""``fleetbus status``: the broker, its sessions, claims and recent facts.

Readable tables for a person, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from typing import Any

import orjson

from fleetbus.claims import ClaimView
from fleetbus.errors import ProtocolError
from fleetbus.ops import render
from fleetbus.ops.link import Link, resolve_url
from fleetbus.ops.tail import target_repo


def gather(link: Link, repo: str | None, facts: int) -> dict[str, Any]:
    """The broker's figures and, per repository, its tables and recent facts."""
    broker = link.request("status")
    repos = [repo] if repo is not None else sorted(broker.get("repos", {}))
    state: dict[str, Any] = {
        "broker": {k: v for k, v in broker.items() if k not in ("rid", "ok")},
        "repos": {},
    }
    for name in repos:
        snapshot = link.request("snapshot", repo=name)
        state["repos"][name] = {
            "seq": snapshot.get("seq"),
            "sessions": snapshot.get("sessions", []),
            "claims": snapshot.get("claims", []),
            "waiters": snapshot.get("waiters", []),
            "facts": _recent_facts(link, name, facts),
        }
    return state


def _recent_facts(link: Link, repo: str, count: int) -> list[dict[str, Any]]:
    if count <= 0:
        return []
    try:
        reply = link.request("facts", repo=repo, limit=count)
    except ProtocolError:
        return []
    return list(reply.get("facts", []))


def render_status(state: dict[str, Any], *, now: float, width: int) -> list[str]:
    """The human form: a broker line, then three tables per repository."""
    broker = state["broker"]
    lines = [
        f"broker {broker.get('url')}  version {broker.get('version')}  "
        f"epoch {broker.get('epoch')}  "
        f"up {render.age(now - float(broker.get('started') or now))}"
    ]
    if not state["repos"]:
        lines.append("no repository has sessions or claims")
    figures = broker.get("repos") or {}
    for repo, tables in state["repos"].items():
        lines.append("")
        indexing = (figures.get(repo) or {}).get("indexing")
        note = ", index still building after a restart" if indexing else ""
        lines.append(f"repository {repo} (seq {tables['seq']}{note})")
        lines.extend(_sessions(tables, now, width))
        lines.extend(_claims(tables, now, width))
        lines.extend(_facts(tables, width))
    return lines


def _sessions(tables: dict[str, Any], now: float, width: int) -> list[str]:
    rows = []
    for s in sorted(tables["sessions"], key=lambda s: s["joined"]):
        meta = s.get("meta") or {}
        rows.append(
            (
                s["name"],
                meta.get("host", "-"),
                meta.get("branch") or "-",
                f"{render.age(now - s['joined'])} ago",
                f"{render.age(now - s['last_seen'])} ago",
                meta.get("worktree", "-"),
            )
        )
    if not rows:
        return ["", "sessions: none"]
    headers = ("SESSION", "HOST", "BRANCH", "SINCE", "HEARD", "WORKTREE")
    return ["", *render.table(headers, rows, width=width)]


def _claims(tables: dict[str, Any], now: float, width: int) -> list[str]:
    view = ClaimView()
    view.load(tables)
    waiting: dict[str, int] = {}
    for waiter in view.waiters:
        for row in view.conflicts(waiter.scopes, waiter.mode, waiter.sid):
            waiting[row.grant] = waiting.get(row.grant, 0) + 1
    grants: dict[str, list[Any]] = {}
    for row in view.claims():
        grants.setdefault(row.grant, []).append(row)
    rows: list[tuple[Any, ...]] = []
    for grant, held in grants.items():
        first = held[0]
        rows.append(
            (
                first.name,
                ", ".join(row.scope.text for row in held),
                first.mode,
                render.age(now - first.since),
                render.expiry(first.expires, now),
                waiting.get(grant, 0),
                first.intent or "-",
            )
        )
    names = {s.sid: s.name for s in view.sessions.values()}
    for waiter in view.waiters:
        rows.append(
            (
                names.get(waiter.sid, waiter.sid),
                ", ".join(scope.text for scope in waiter.scopes),
                f"{waiter.mode}, waiting",
                render.age(now - waiter.since),
                "-",
                "-",
                waiter.intent or "-",
            )
        )
    if not rows:
        return ["", "claims: none"]
    headers = ("HOLDER", "SCOPES", "MODE", "AGE", "EXPIRES", "WAITERS", "INTENT")
    return ["", *render.table(headers, rows, width=width)]


def _facts(tables: dict[str, Any], width: int) -> list[str]:
    rows = [
        (
            render.stamp(f.get("at")),
            f.get("kind"),
            f.get("name"),
            ", ".join(f.get("topics") or []),
            f.get("body", ""),
        )
        for f in reversed(tables["facts"])
    ]
    if not rows:
        return ["", "facts: none"]
    headers = ("AT", "KIND", "BY", "TOPICS", "TEXT")
    return ["", *render.table(headers, rows, width=width)]


def run(args: argparse.Namespace) -> int:
    """Print the status once; returns the exit code."""
    repo, _info = target_repo(args)
    with Link(resolve_url(args.url), timeout=args.timeout) as link:
        state = gather(link, repo, args.facts)
    if args.json:
        sys.stdout.write(orjson.dumps(state, option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
        sys.stdout.flush()
        return 0
    width = shutil.get_terminal_size((120, 24)).columns if sys.stdout.isatty() else 0
    for line in render_status(state, now=time.time(), width=width):
        sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0
