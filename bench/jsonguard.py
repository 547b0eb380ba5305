"""The claim guard people write without fleetbus: a JSON-lines file of claims,
read by a fresh process on every check.

``python bench/jsonguard.py CLAIMS PATH SID`` exits 0 when ``SID`` may edit
``PATH`` (no other session's pattern matches it) and 1 otherwise.
"""

import fnmatch
import json
import re
import sys


def main() -> int:
    claims, path, sid = sys.argv[1:4]
    with open(claims) as lines:
        for line in lines:
            row = json.loads(line)
            pattern = re.compile(fnmatch.translate(row["scope"]))
            if row["sid"] != sid and pattern.match(path):
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
