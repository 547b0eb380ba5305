"""``python -m bench``: run the scenarios, print a table, write the figures."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import table
from bench.context import Run
from bench.harness import versions
from bench.stats import Report


def _scenarios() -> dict[str, Callable[[Run], None]]:
    from bench import fanout, guard, local, rtt, startup, state, throughput

    return {
        "rtt": rtt.run,
        "local": local.run,
        "decision": local.run_decision,
        "pairs": throughput.run_pairs,
        "facts": throughput.run_facts,
        "fanout": fanout.run,
        "hook": startup.run,
        "guard": guard.run,
        "join": state.run_join,
        "memory": state.run_memory,
    }


def build_parser() -> argparse.ArgumentParser:
    """The suite's options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark fleetbus against baselines."
    )
    parser.add_argument(
        "--quick", action="store_true", help="scaled down: about a minute"
    )
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument(
        "--only", help="comma-separated scenarios to run (default: all)"
    )
    parser.add_argument("--reps", type=int, help="repetitions (default 3 / 5)")
    parser.add_argument(
        "--install-peers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="apt-get install missing redis-server / nats-server "
        "(default: in a full run)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the suite; the exit code is 0 unless the harness itself broke."""
    args = build_parser().parse_args(argv)
    scenarios = _scenarios()
    chosen = list(scenarios) if not args.only else args.only.split(",")
    unknown = [name for name in chosen if name not in scenarios]
    if unknown:
        print(f"unknown scenario(s): {', '.join(unknown)}", file=sys.stderr)
        return 2
    from fleetbus import log

    log.configure("warning", json=True, stream=sys.stderr)
    report = Report(env=versions())
    install = args.install_peers if args.install_peers is not None else not args.quick
    broken = 0
    with tempfile.TemporaryDirectory(prefix="fb-bench-") as scratch:
        run = Run(
            quick=args.quick,
            reps=args.reps or (3 if args.quick else 5),
            workdir=Path(scratch),
            report=report,
            install_peers=install,
        )
        report.env.update(mode="quick" if args.quick else "full", reps=run.reps)
        if install and {"rtt", "facts"} & set(chosen):
            from bench import peers

            print("[peers] ...", file=sys.stderr, flush=True)
            report.notes["peers.install"] = peers.install(["redis", "nats"])
        began = time.monotonic()
        for name in chosen:
            started = time.monotonic()
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            try:
                scenarios[name](run)
            except Exception as exc:
                broken += 1
                traceback.print_exc()
                report.notes[f"scenario.{name}"] = f"failed: {exc!r}"
            took = time.monotonic() - started
            report.env.setdefault("seconds", {})[name] = round(took, 1)
        report.env["total_seconds"] = round(time.monotonic() - began, 1)
    table.judge(report)
    print(table.render(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
