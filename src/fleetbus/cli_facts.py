"""The fact commands of ``fleetbus``: ``fact``, ``facts`` and ``retract``.

Like :mod:`fleetbus.cli`, only the standard library is imported at module
level. The commands follow the session and exit-code rules of the claim
commands; a fact that is too long or malformed exits with 2.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from fleetbus.client import AsyncSession
    from fleetbus.facts import Fact

KINDS = ("note", "warning", "decision", "gotcha", "question")
MAX_LIMIT = 10_000
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

AddCommand = Callable[[str, str], argparse.ArgumentParser]


def register(add: AddCommand) -> None:
    """Add ``fact``, ``facts`` and ``retract`` with ``add`` (which builds a
    subcommand parser with the client options)."""
    fact = add("fact", "publish a learned fact on TOPIC")
    fact.add_argument("topic", metavar="TOPIC", help="path, directory, glob, @name")
    fact.add_argument("text", metavar="TEXT", help="the fact (at most 4 KiB)")
    fact.add_argument("--kind", choices=KINDS, help="kind of fact (default: note)")
    fact.add_argument(
        "--ttl", type=_positive_seconds, metavar="SECONDS", help="expire after SECONDS"
    )
    fact.add_argument("--supersedes", metavar="ID", help="the fact this one replaces")
    fact.set_defaults(run=run_fact)

    facts = add("facts", "list the retained facts, or those on SCOPE")
    facts.add_argument("scope", nargs="?", metavar="SCOPE")
    facts.add_argument("--search", metavar="TEXT", help="facts with all these words")
    facts.add_argument("--kind", choices=KINDS, help="only facts of this kind")
    facts.add_argument("--author", metavar="WHO", help="only facts by this session")
    facts.add_argument(
        "--since",
        type=parse_since,
        metavar="WHEN",
        help="a seq number, an ISO time, or an age such as 10m or 2h",
    )
    facts.add_argument(
        "--history",
        action="store_true",
        help="also superseded, retracted and expired facts",
    )
    facts.add_argument(
        "--limit",
        type=_limit,
        default=100,
        help="at most this many, the newest unless --since is a seq (default: 100)",
    )
    facts.set_defaults(run=run_facts)

    retract = add("retract", "withdraw a fact this session published")
    retract.add_argument("id", metavar="ID")
    retract.set_defaults(run=run_retract)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds > 0: {text!r}")
    return value


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(
            f"not a number from 1 to {MAX_LIMIT}: {text!r}"
        )
    return value


def parse_since(text: str, now: float | None = None) -> int | float:
    """``--since WHEN``: a seq (an ``int``) or a wall time (a ``float``).

    WHEN is digits (a sequence number), an age (``90s``, ``10m``, ``2h``,
    ``1d``, ``1w``, also combined: ``1h30m``) or an ISO 8601 time (local
    time unless it names a zone).
    """
    text = text.strip()
    if text.isdigit():
        return int(text)
    ages = _AGE.findall(text)
    if ages and "".join(n + u for n, u in ages) == text:
        seconds = sum(float(n) * _UNITS[u] for n, u in ages)
        return (time.time() if now is None else now) - seconds
    from datetime import datetime

    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a seq number, an age (10m, 2h) or an ISO time: {text!r}"
        ) from None


# -- commands --------------------------------------------------------------------


def run_fact(args: argparse.Namespace) -> int:
    """``fleetbus fact``: publish one fact."""
    from fleetbus.cli import _print, _print_json, _run

    _check_text(args.text)

    async def body(session: AsyncSession) -> int:
        fact = await _refuse_as_bad_input(
            session.publish(
                args.topic,
                text=args.text,
                kind=args.kind,
                ttl=args.ttl,
                supersedes=args.supersedes,
            )
        )
        if args.json:
            _print_json({"fact": fact.to_wire()})
        else:
            _print(f"published {fact.id} (seq {fact.seq})")
        return 0

    return _run(args, body, join=True, replica=False)


def run_facts(args: argparse.Namespace) -> int:
    """``fleetbus facts``: list retained facts, and say when more matched."""
    from fleetbus.cli import PROG, _print, _print_json, _run

    async def body(session: AsyncSession) -> int:
        scopes = [args.scope] if args.scope else []
        # One more than shown tells whether the listing was cut short.
        found = await session.facts(
            *scopes,
            kind=args.kind,
            author=args.author,
            since=args.since,
            search=args.search,
            limit=min(args.limit + 1, MAX_LIMIT),
            include_history=args.history,
        )
        more = len(found) > args.limit
        if more:
            # Since a seq the broker keeps the first that match, else the newest.
            found = found[: args.limit] if isinstance(args.since, int) else found[1:]
        if args.json:
            _print_json(
                {
                    "repo": session.repo.id,
                    "facts": [f.to_wire() for f in found],
                    "more": more,
                }
            )
            return 0
        if not found:
            _print("no facts")
        for fact in found:
            _print(describe(fact))
        if more:
            print(
                f"{PROG}: more than {args.limit} facts match; "
                "narrow the query or raise --limit",
                file=sys.stderr,
            )
        return 0

    return _run(args, body, join=False, replica=False)


def run_retract(args: argparse.Namespace) -> int:
    """``fleetbus retract``: withdraw one of this session's facts."""
    from fleetbus.cli import _print, _print_json, _run

    async def body(session: AsyncSession) -> int:
        fact = await session.retract(args.id)
        if args.json:
            _print_json({"fact": fact.to_wire()})
        else:
            _print(f"retracted {fact.id}")
        return 0

    return _run(args, body, join=True, replica=False)


def _check_text(text: str) -> None:
    from fleetbus.facts import check_body

    check_body(text)


async def _refuse_as_bad_input(request: Any) -> Any:
    """Await a publish; a size limit the broker enforces is the caller's input
    error, so it exits with 2 like any malformed fact."""
    from fleetbus.errors import LimitExceeded
    from fleetbus.facts import FactTooLarge

    try:
        return await request
    except LimitExceeded as exc:
        raise FactTooLarge(exc.message, **exc.details) from None


def describe(fact: Fact) -> str:
    """One line for a fact: id, kind, topics, author, age and text."""
    from fleetbus.cli import _duration

    topics = ", ".join(topic.text for topic in fact.topics)
    state = "" if fact.live else f" [{fact.state}]"
    age = _duration(time.time() - fact.at)
    text = " ".join(fact.body.split())
    return f"{fact.id}  {fact.kind}{state}  {topics}  {fact.name}  {age} ago  {text}"
