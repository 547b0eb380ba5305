"""The ``fleetbus`` command: run the broker, claim and release, watch the fleet.

Only the standard library is imported at module level: every command imports
what it needs when it runs, so that short-lived commands start fast.
"""

from __future__ import annotations

import argparse
import os
import sys

# Evaluated as true by type checkers only; imports below cost nothing at run time.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any

    from fleetbus.claims import Claim
    from fleetbus.client import AsyncSession

PROG = "fleetbus"
DEFAULT_TTL_S = 3600.0
SESSION_ENV = "FLEETBUS_SESSION"
AGENT_SESSION_ENV = "CLAUDE_CODE_SESSION_ID"

EPILOG = """\
exit codes:
  0  done
  1  refused: conflict, deadlock, wait timed out, not the owner
  2  usage error or bad input
  3  broker unreachable
"""


def main(argv: list[str] | None = None) -> int:
    """Run one ``fleetbus`` command; returns its exit code."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    if args_list[:1] == ["broker"]:
        from fleetbus.broker.main import main as broker_main

        return broker_main(args_list[1:])
    if args_list[:1] == ["hook"]:
        # Runs on every tool call of an agent: only the standard library.
        from fleetbus.agents.hooks import main as hook_main

        return hook_main(args_list[1:])
    args = build_parser().parse_args(args_list)
    if args.command is None:
        build_parser().print_help(sys.stderr)
        return 2
    try:
        code: int = args.run(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        _silence_stdout()
        return 0
    except Exception as exc:
        return _report(exc, json_out=getattr(args, "json", False))
    return code


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand but ``broker``, which parses its own."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Claims and learned facts for a fleet of coding-agent sessions.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "broker",
        help="run the broker in the foreground (see: fleetbus broker --help)",
        add_help=False,
    )
    commands.add_parser(
        "hook",
        help="answer a coding agent's hook: fleetbus hook claude-code|codex|gemini",
        add_help=False,
    )
    client = _client_options()

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        return commands.add_parser(
            name,
            help=help_text,
            description=help_text[0].upper() + help_text[1:] + ".",
            parents=[client],
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    claim = add("claim", "claim scopes before editing them")
    claim.add_argument("scopes", nargs="+", metavar="SCOPE")
    claim.add_argument("--intent", default="", help="what you are about to do")
    claim.add_argument("--shared", action="store_true", help="a shared claim")
    claim.add_argument(
        "--wait", type=_seconds, metavar="SECONDS", help="queue for up to SECONDS"
    )
    claim.add_argument(
        "--ttl",
        type=_positive_seconds,
        default=DEFAULT_TTL_S,
        metavar="SECONDS",
        help="how long the claim lives (default: %(default)g)",
    )
    claim.set_defaults(run=_run_claim)

    release = add("release", "release claims of this session")
    release.add_argument("scopes", nargs="*", metavar="SCOPE")
    release.add_argument("--all", action="store_true", help="release every claim")
    release.add_argument(
        "--force",
        action="store_true",
        help="operators: release every session's claims on SCOPEs (logged)",
    )
    release.set_defaults(run=_run_release)

    claims = add("claims", "list the claims, or those overlapping SCOPE")
    claims.add_argument("scope", nargs="?", metavar="SCOPE")
    claims.set_defaults(run=_run_claims)

    who = add("who", "show who holds PATH")
    who.add_argument("path", metavar="PATH")
    who.set_defaults(run=_run_who)

    from fleetbus.cli_facts import register as add_fact_commands

    add_fact_commands(add)

    _add_agent_commands(commands)
    from fleetbus.ops.args import add_commands as add_operating_commands

    add_operating_commands(commands)
    return parser


def _add_agent_commands(commands: Any) -> None:
    """``guard``, ``install`` and ``mcp``: the commands agents and git run."""
    guard = commands.add_parser(
        "guard", help="run the git guard as git hook HOOK (see: install git)"
    )
    guard.add_argument(
        "hook",
        choices=("pre-commit", "pre-push", "post-commit", "reference-transaction"),
    )
    guard.add_argument("hook_args", nargs=argparse.REMAINDER, metavar="ARG")
    guard.set_defaults(run=_run_guard)

    install = commands.add_parser(
        "install", help="write fleetbus into an agent's configuration or git hooks"
    )
    install.add_argument(
        "target", choices=("claude-code", "codex", "gemini", "git", "mcp")
    )
    install.add_argument("--repo", metavar="DIR", help="repository (default: cwd)")
    install.add_argument("--user", action="store_true", help="user-level config")
    install.add_argument("--uninstall", action="store_true", help="take it out")
    install.add_argument(
        "--memory", action="store_true", help="add the snippet to the memory file"
    )
    install.add_argument(
        "--print-snippet", action="store_true", help="print the memory snippet"
    )
    install.set_defaults(run=_run_install)

    mcp = commands.add_parser("mcp", help="serve the fleetbus tools over MCP (stdio)")
    mcp.add_argument("--repo", metavar="DIR", help="repository (default: cwd)")
    mcp.add_argument("--url", help="broker URL (default: $FLEETBUS_URL or local)")
    mcp.add_argument("--session", help="session id (default: the agent's)")
    mcp.set_defaults(run=_run_mcp)

    keys = commands.add_parser(
        "keys", help="create CURVE key pairs for the broker and its clients"
    )
    keys.add_argument("names", nargs="+", metavar="NAME")
    keys.add_argument(
        "--dir", metavar="DIR", help="where (default: ~/.config/fleetbus/keys)"
    )
    keys.set_defaults(run=_run_keys)


def _run_guard(args: argparse.Namespace) -> int:
    from fleetbus.agents.gitguard import run_hook

    return run_hook(args.hook, args.hook_args)


def _run_install(args: argparse.Namespace) -> int:
    from fleetbus.agents.install import run

    return run(
        args.target,
        repo=args.repo,
        user=args.user,
        uninstall=args.uninstall,
        memory=args.memory,
        print_snippet=args.print_snippet,
    )


def _run_keys(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fleetbus.security import run_keys

    return run_keys(Path(args.dir) if args.dir else None, args.names)


def _run_mcp(args: argparse.Namespace) -> int:
    from fleetbus.agents.mcp_server import serve

    return serve(repo=args.repo, url=args.url, session_id=args.session)


def _client_options() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--repo", default=None, metavar="DIR", help="repository (default: cwd)"
    )
    parent.add_argument("--url", help="broker URL (default: $FLEETBUS_URL or local)")
    parent.add_argument(
        "--session",
        help=f"session id (default: ${SESSION_ENV}, ${AGENT_SESSION_ENV}, "
        "else cli-USER@HOST)",
    )
    parent.add_argument("--name", help="name other sessions see")
    parent.add_argument(
        "--timeout",
        type=_seconds,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the broker (default: %(default)g)",
    )
    parent.add_argument("--json", action="store_true", help="machine-readable output")
    return parent


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be more than 0 seconds")
    return value


def session_id(explicit: str | None = None) -> str:
    """The CLI's session id: explicit, from the environment, else per user."""
    found = explicit or os.environ.get(SESSION_ENV) or os.environ.get(AGENT_SESSION_ENV)
    if found:
        return found
    import getpass
    import socket

    return f"cli-{getpass.getuser()}@{socket.gethostname()}"


# -- running commands ----------------------------------------------------------


def _run(args: argparse.Namespace, body: Any, *, join: bool, replica: bool) -> int:
    import asyncio

    async def go() -> int:
        session = await _attach(args, join=join, replica=replica)
        try:
            result: int = await body(session)
            return result
        finally:
            await session.close(leave=False)

    return asyncio.run(go())


async def _attach(
    args: argparse.Namespace, *, join: bool, replica: bool
) -> AsyncSession:
    from fleetbus import log

    log.configure("error", stream=sys.stderr)
    if join and args.url is None:
        # Inside an agent session, claims belong on that session's lease.
        from fleetbus.agents import sessionproxy

        proxy = sessionproxy.attach(args.session, implicit_ttl=DEFAULT_TTL_S)
        if proxy is not None:
            return proxy  # type: ignore[return-value]
    from fleetbus.client import AsyncSession

    sid = session_id(args.session)
    return await AsyncSession.connect(
        args.url,
        repo=args.repo,
        session_id=sid,
        name=args.name or sid,
        leased=False,
        timeout=args.timeout,
        replica=replica,
        join=join,
    )


def _run_claim(args: argparse.Namespace) -> int:
    async def body(session: AsyncSession) -> int:
        grant = await session.claim(
            *args.scopes,
            shared=args.shared,
            intent=args.intent,
            ttl=args.ttl,
            wait=args.wait,
        )
        if args.json:
            _print_json(
                {
                    "grant": grant.id,
                    "fence": grant.fence,
                    "claims": [row.to_wire() for row in grant.claims],
                }
            )
        else:
            scopes = ", ".join(row.scope.text for row in grant.claims)
            mode = "shared" if args.shared else "exclusive"
            # Through an agent's sidecar the default TTL gives way to its lease.
            leased = all(row.expires is None for row in grant.claims)
            life = "with the session" if leased else f"for {_duration(args.ttl)}"
            _print(
                f"claimed {scopes} ({mode}, {life}); "
                f"grant {grant.id}, fence {grant.fence}"
            )
        return 0

    return _run(args, body, join=True, replica=False)


def _run_release(args: argparse.Namespace) -> int:
    if bool(args.scopes) == bool(args.all):
        _usage("release", "give SCOPEs or --all, not both and not neither")
    if args.force and args.all:
        _usage("release", "--force takes SCOPEs, not --all")

    async def body(session: AsyncSession) -> int:
        if args.force:
            released = await session.force_release(*args.scopes)
        else:
            released = await session.release(*args.scopes, all=args.all)
        if args.json:
            _print_json({"released": released})
        elif released:
            _print(f"released {len(released)} claim{'s' * (len(released) != 1)}")
        else:
            _print("nothing to release")
        return 0

    return _run(args, body, join=True, replica=False)


def _run_claims(args: argparse.Namespace) -> int:
    async def body(session: AsyncSession) -> int:
        view = await _view(session)
        if args.scope:
            from fleetbus.repo import resolve_scope

            rows = list(view.overlapping(resolve_scope(args.scope, session.repo)))
        else:
            rows = view.claims()
        rows.sort(key=lambda row: (row.fence, row.id))
        if args.json:
            _print_json({"repo": session.repo.id, "claims": _wire(rows)})
        else:
            _print_table(rows)
        return 0

    return _run(args, body, join=False, replica=False)


def _run_who(args: argparse.Namespace) -> int:
    async def body(session: AsyncSession) -> int:
        from fleetbus.repo import repo_path

        path = repo_path(args.path, session.repo)
        rows = (await _view(session)).holders(path)
        if args.json:
            _print_json({"path": path, "holders": _wire(rows)})
        elif rows:
            for row in rows:
                _print(row.describe())
        else:
            _print(f"nobody holds {path}")
        return 0

    return _run(args, body, join=False, replica=False)


# -- output ---------------------------------------------------------------------


async def _view(session: AsyncSession) -> Any:
    from fleetbus.claims import ClaimView

    view = ClaimView()
    view.load(await session.snapshot())
    return view


def _wire(rows: Iterable[Claim]) -> list[dict[str, Any]]:
    return [row.to_wire() for row in rows]


def _print(line: str) -> None:
    print(line, flush=True)


def _print_json(value: Any) -> None:
    import orjson

    sys.stdout.buffer.write(orjson.dumps(value) + b"\n")
    sys.stdout.buffer.flush()


def _print_table(rows: list[Claim]) -> None:
    if not rows:
        _print("no claims")
        return
    import time

    now = time.time()
    table = [("HOLDER", "SCOPE", "MODE", "INTENT", "AGE", "EXPIRES")]
    table += [
        (
            row.name,
            row.scope.text,
            row.mode,
            row.intent,
            _duration(now - row.since),
            _expiry(row.expires, now),
        )
        for row in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]) - 1)]
    for line in table:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        _print("  ".join([*cells, line[-1]]).rstrip())


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _expiry(expires: float | None, now: float) -> str:
    if expires is None:
        return "with session"
    if expires <= now:
        return "now"
    return "in " + _duration(expires - now)


# -- errors ---------------------------------------------------------------------


def _usage(command: str, message: str) -> None:
    print(f"{PROG} {command}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _report(exc: Exception, *, json_out: bool) -> int:
    from fleetbus.errors import FleetbusError

    if isinstance(exc, FleetbusError):
        message, code = exc.message, exc.exit_code
        if json_out:
            _print_json({"error": exc.to_wire()})
    else:
        message, code = f"unexpected {type(exc).__name__}: {exc}", 1
    line = " ".join(str(message).split())
    print(f"{PROG}: {line}", file=sys.stderr)
    return code


def _silence_stdout() -> None:
    """After a broken pipe, send what is left to /dev/null, quietly."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
