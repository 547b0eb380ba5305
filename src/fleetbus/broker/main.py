"""``fleetbus broker``: run the broker in the foreground.

Settings come from flags, ``FLEETBUS_*`` variables and a TOML file, in that
order of precedence (see :mod:`fleetbus.config`); a bad one stops the start
with a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fleetbus import config, paths
from fleetbus.broker.config import BrokerConfig

EXIT_CODES = """\
exit codes:
  0  stopped by SIGTERM or SIGINT
  2  a bad setting
  3  cannot bind its sockets or make their directory (or another broker serves)
  4  cannot open its store
"""


def build_parser() -> argparse.ArgumentParser:
    """The broker's command-line options; every one defaults to "not given"."""
    parser = argparse.ArgumentParser(
        prog="fleetbus broker",
        description="Run the fleetbus broker until SIGTERM or SIGINT.",
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        type=Path,
        help=f"TOML settings file (default: ${config.CONFIG_ENV}, "
        "else ~/.config/fleetbus/config.toml when present)",
    )
    parser.add_argument(
        "--url",
        help="control socket to bind, ipc://PATH or tcp://HOST:PORT (port 0: any, "
        f"logged in broker.started; default: ${paths.URL_ENV}, else a private ipc "
        "socket)",
    )
    parser.add_argument(
        "--pub-url", help="event socket to bind (default: derived from --url)"
    )
    parser.add_argument(
        "--data",
        type=Path,
        help=f"data directory (default: ${paths.DATA_ENV}, else the user's)",
    )
    parser.add_argument("--lease-ms", type=int, help="session lease (default 5000)")
    parser.add_argument(
        "--grace-ms",
        type=int,
        help="extra reconnect time after a restart (default: one lease)",
    )
    parser.add_argument("--heartbeat-ms", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--max-batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--pub-hwm", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--fsync",
        action="store_const",
        const=True,
        help="sync the store to disk at every commit (survives power loss)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP on HOST:PORT (port 0: any)",
    )
    parser.add_argument(
        "--facts-max", type=int, help="facts retained per repository (100000)"
    )
    parser.add_argument(
        "--facts-max-age-s",
        type=int,
        help="longest a fact is retained, in seconds (30 days)",
    )
    parser.add_argument(
        "--request-memory-s",
        type=int,
        help="how long replies are kept for retried requests (600)",
    )
    parser.add_argument(
        "--rate-per-s", type=int, help="requests a second per session (10000; 0: any)"
    )
    parser.add_argument("--rate-burst", type=int, help="burst per peer (20000)")
    parser.add_argument(
        "--curve-secret",
        type=Path,
        help="the broker's CURVE secret key file (turns on CURVE)",
    )
    parser.add_argument(
        "--curve-allow", type=Path, help="directory of admitted client public keys"
    )
    parser.add_argument(
        "--curve-operators",
        type=Path,
        help="directory of operator public keys (may force-release)",
    )
    parser.add_argument(
        "--local-operator",
        action=argparse.BooleanOptionalAction,
        help="the local user may force-release (default: yes)",
    )
    parser.add_argument(
        "--cross-repo",
        action=argparse.BooleanOptionalAction,
        help="any admitted credential may read every repository (default: no)",
    )
    parser.add_argument("--log-level", help="debug, info, warning or error")
    parser.add_argument(
        "--log-json",
        action=argparse.BooleanOptionalAction,
        help="JSON log lines (default: when stderr is not a terminal)",
    )
    return parser


def resolve(argv: list[str] | None = None) -> BrokerConfig:
    """The broker's settings from ``argv``, the environment and the config file.

    Raises :class:`fleetbus.config.ConfigError` for a bad setting.
    """
    args = vars(build_parser().parse_args(argv))
    file = args.pop("config")
    settings = config.load(args, config=file)
    data = settings["data"]
    if (settings["curve_secret"] is None) != (settings["curve_allow"] is None):
        raise config.ConfigError("CURVE needs both --curve-secret and --curve-allow")
    return BrokerConfig(
        url=paths.resolve_url(settings["url"]),
        data_dir=data if data is not None else paths.data_dir(),
        pub_url=settings["pub_url"],
        lease_ms=settings["lease_ms"],
        grace_ms=settings["grace_ms"],
        heartbeat_interval_ms=settings["heartbeat_ms"],
        max_batch=settings["max_batch"],
        synchronous="FULL" if settings["fsync"] else "NORMAL",
        log_level=settings["log_level"],
        log_json=settings["log_json"],
        metrics=settings["metrics"],
        facts_max=settings["facts_max"],
        facts_max_age_s=settings["facts_max_age_s"],
        rate_per_s=settings["rate_per_s"],
        request_memory_s=settings["request_memory_s"],
        pub_hwm=settings["pub_hwm"],
        rate_burst=settings["rate_burst"],
        curve_secret=settings["curve_secret"],
        curve_allow=settings["curve_allow"],
        curve_operators=settings["curve_operators"],
        local_operator=settings["local_operator"],
        cross_repo=settings["cross_repo"],
    )


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the broker; returns the exit code."""
    try:
        broker_config = resolve(argv)
    except config.ConfigError as exc:
        print(f"fleetbus broker: {exc.message}", file=sys.stderr)
        return exc.exit_code
    from fleetbus.broker.server import run

    return run(broker_config)
