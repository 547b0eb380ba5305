"""``fleetbus broker``: run the broker in the foreground."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from fleetbus import paths
from fleetbus.broker.config import BrokerConfig


def build_parser() -> argparse.ArgumentParser:
    """The broker's command-line options."""
    parser = argparse.ArgumentParser(
        prog="fleetbus broker",
        description="Run the fleetbus broker until SIGTERM or SIGINT.",
    )
    parser.add_argument(
        "--url",
        help="control socket to bind, ipc://PATH or tcp://HOST:PORT "
        f"(default: ${paths.URL_ENV}, else a private ipc socket)",
    )
    parser.add_argument(
        "--pub-url", help="event socket to bind (default: derived from --url)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help=f"data directory (default: ${paths.DATA_ENV}, else the user's)",
    )
    parser.add_argument("--lease-ms", type=int, default=5000, help="session lease")
    parser.add_argument(
        "--grace-ms",
        type=int,
        default=None,
        help="extra reconnect time after a restart (default: one lease)",
    )
    parser.add_argument(
        "--fsync",
        action="store_true",
        help="sync the store to disk at every commit (survives power loss)",
    )
    parser.add_argument("--log-level", default=os.environ.get("FLEETBUS_LOG", "info"))
    parser.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="JSON log lines (default: when stderr is not a terminal)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the broker; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.lease_ms < 100:
        build_parser().error("--lease-ms must be at least 100")
    config = BrokerConfig(
        url=paths.resolve_url(args.url),
        data_dir=args.data or paths.data_dir(),
        pub_url=args.pub_url,
        lease_ms=args.lease_ms,
        grace_ms=args.grace_ms,
        synchronous="FULL" if args.fsync else "NORMAL",
        log_level=args.log_level,
        log_json=args.log_json,
    )
    from fleetbus.broker.server import run

    return run(config)
