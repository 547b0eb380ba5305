"""``fleetbus unbind SID``: free a session id from the credential that opened it.

Under CURVE the first ``hello`` of a session id binds it to the client's key
for good, so a client whose key was replaced is refused as its old ids
(``cli-USER@HOST`` among them). An operator frees such an id; the next
credential to open it owns it, with its claims and facts.
"""

from __future__ import annotations

import argparse
import sys

import orjson

from fleetbus.ops.link import Link, resolve_url


def run(args: argparse.Namespace) -> int:
    """Send ``unbind`` and say what became of the session; the exit code."""
    fields = {"target": args.sid}
    if args.by:
        fields["by"] = args.by
    with Link(resolve_url(args.url), timeout=args.timeout) as link:
        reply = link.request("unbind", **fields)
    live = bool(reply.get("live"))
    if args.json:
        line = orjson.dumps({"unbound": args.sid, "live": live}).decode()
    else:
        state = "live" if live else "not live"
        line = f"unbound {args.sid} ({state}): the next credential to open it owns it"
    sys.stdout.write(line + "\n")
    sys.stdout.flush()
    return 0
