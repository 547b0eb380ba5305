"""The command-line options of the operating commands, standard library only.

:func:`add_commands` registers ``tail``, ``status``, ``top``, ``unbind``,
``demo`` and ``doctor`` on the ``fleetbus`` parser; each command's module is
imported only when it runs, so building the parser stays cheap for every other
command.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

EXIT_CODES = """\
exit codes:
  0  done (doctor: healthy)
  1  doctor: problems found
  2  usage error or bad input
  3  broker unreachable
"""


def add_commands(commands: Any) -> None:
    """Add the operating commands to ``commands`` (an argparse subparsers)."""
    tail = _command(
        commands,
        "tail",
        "watch the fleet's events live, one line each, optionally only on SCOPEs",
    )
    tail.add_argument("scopes", nargs="*", metavar="SCOPE", help="overlapping only")
    tail.add_argument(
        "--kind",
        action="append",
        metavar="KIND",
        help="claim, session, wait, fact, a verb (expired), a fact kind (gotcha) "
        "or an exact type (claim.granted); repeat or separate with commas",
    )
    tail.add_argument(
        "--session",
        action="append",
        metavar="NAME",
        help="only events of this session (name or id); repeatable",
    )
    tail.add_argument(
        "--since",
        metavar="WHEN",
        help="first replay retained history after a seq (120), for a duration "
        "(10m, 2h) or from an ISO time, then follow",
    )
    _repo_options(tail)
    _set_run(tail, "tail")

    status = _command(
        commands, "status", "show the sessions, claims and recent facts as tables"
    )
    status.add_argument(
        "--facts", type=int, default=10, metavar="N", help="recent facts to show"
    )
    _repo_options(status)
    _set_run(status, "status")

    top = _command(commands, "top", "a live board of the fleet (q quits)")
    top.add_argument(
        "--interval",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="redraw period (default: %(default)g)",
    )
    _repo_options(top, json=False)
    _set_run(top, "top")

    unbind = _command(
        commands,
        "unbind",
        "operators: free session id SID from the key that opened it; the next "
        "credential to open it owns it (logged)",
    )
    unbind.add_argument("sid", metavar="SID")
    unbind.add_argument("--url", help="broker URL (default: $FLEETBUS_URL or local)")
    unbind.add_argument("--by", metavar="NAME", help="who does it, for the log")
    unbind.add_argument("--json", action="store_true", help="JSON output")
    unbind.add_argument("--timeout", type=float, default=3.0, help=argparse.SUPPRESS)
    _set_run(unbind, "unbind")

    demo = _command(
        commands,
        "demo",
        "run a private broker and simulated sessions that claim, collide, wait "
        "and share facts",
    )
    demo.add_argument("--url", help="use this broker instead of a private one")
    demo.add_argument(
        "--speed", type=float, default=1.0, help="faster above 1 (default: 1)"
    )
    demo.add_argument(
        "--rounds", type=int, default=2, help="rounds of work (default: 2)"
    )
    demo.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep the private broker up this long after the demo, for top/tail",
    )
    _set_run(demo, "demo")

    doctor = _command(
        commands, "doctor", "check the broker, this machine and this repository"
    )
    doctor.add_argument("--url", help="broker URL (default: $FLEETBUS_URL or local)")
    doctor.add_argument("--repo", metavar="DIR", help="repository (default: cwd)")
    doctor.add_argument(
        "--broker-only", action="store_true", help="only check that it answers"
    )
    doctor.add_argument("--json", action="store_true", help="JSON output")
    doctor.add_argument("--timeout", type=float, default=3.0, help=argparse.SUPPRESS)
    _set_run(doctor, "doctor")


def _command(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _repo_options(parser: argparse.ArgumentParser, *, json: bool = True) -> None:
    parser.add_argument("--url", help="broker URL (default: $FLEETBUS_URL or local)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--repo",
        metavar="DIR|ID",
        help="a repository directory or id (default: the current repository)",
    )
    where.add_argument(
        "--all-repos", action="store_true", help="every repository of the broker"
    )
    parser.add_argument("--timeout", type=float, default=3.0, help=argparse.SUPPRESS)
    if json:
        parser.add_argument("--json", action="store_true", help="JSON lines output")


def _set_run(parser: argparse.ArgumentParser, module: str) -> None:
    def run(args: argparse.Namespace) -> int:
        command = importlib.import_module(f"fleetbus.ops.{module}")
        code: int = command.run(args)
        return code

    parser.set_defaults(run=run)
