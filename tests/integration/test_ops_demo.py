"""``fleetbus demo`` runs to completion, on its own broker or on a given one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.support.brokerproc import BrokerProcess

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")


def test_demo_with_its_own_broker_runs_to_the_end(short_tmp: Path) -> None:
    """Collisions, a wait, facts and departures, then ``done`` and exit 0."""
    done = subprocess.run(
        [FLEETBUS, "demo", "--speed", "100", "--rounds", "1"],
        cwd=short_tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith("broker on ipc://")
    for step in ("is refused", "queues for", "shares a gotcha", "gets", "leaves"):
        assert step in out, step
    assert out.rstrip().endswith("done")
    workdir = Path(out.split()[2][len("ipc://") :]).parent
    assert not workdir.exists(), "the private broker's files are removed"


def test_demo_on_a_given_broker_leaves_it_clean(
    broker: BrokerProcess, short_tmp: Path
) -> None:
    """With ``--url`` the demo uses that broker, and its sessions all leave."""
    done = subprocess.run(
        [FLEETBUS, "demo", "--url", broker.url, "--speed", "100", "--rounds", "2"],
        cwd=short_tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )
    status = subprocess.run(
        [FLEETBUS, "status", "--url", broker.url, "--all-repos"],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout.count("round ") == 2
    assert "sessions: none" in status.stdout
    assert "claims: none" in status.stdout
