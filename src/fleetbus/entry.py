"""The ``fleetbus`` console script.

Agent hooks run ``fleetbus hook …`` on every tool call, so that path is
dispatched here before the CLI module (and argparse) is imported, to
:func:`fleetbus.agents.hookclient.hook`, which imports next to nothing when
the session's sidecar runs. For the same reason this module has no
``from __future__`` import: it would import the ``__future__`` module.
"""

import sys


def main() -> int:
    """Run ``fleetbus`` with the process's arguments."""
    argv = sys.argv[1:]
    if argv[:1] == ["hook"]:
        from fleetbus.agents.hookclient import hook

        return hook(argv[1:])
    from fleetbus.cli import main as cli_main

    return cli_main(argv)
