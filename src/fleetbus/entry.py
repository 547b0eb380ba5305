"""The ``fleetbus`` console script.

Agent hooks run ``fleetbus hook …`` on every tool call, so that path is
dispatched here before the CLI module (and argparse) is imported.
"""

from __future__ import annotations

import sys


def main() -> int:
    """Run ``fleetbus`` with the process's arguments."""
    argv = sys.argv[1:]
    if argv[:1] == ["hook"]:
        from fleetbus.agents.hooks import main as hook_main

        return hook_main(argv[1:])
    from fleetbus.cli import main as cli_main

    return cli_main(argv)
