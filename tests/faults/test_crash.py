"""SIGKILL of the broker at each point of its commit path, under load."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest

from tests.faults import checkers, scenario
from tests.faults.conftest import long_seeds
from tests.faults.harness import Fleet, wait_for

FAILPOINTS = ("before_commit", "after_commit", "after_reply")


def crash_run(
    fleet: Fleet,
    points: Sequence[str],
    seed: int,
    *,
    workers: int = 3,
    ops: int = 60,
) -> dict[str, object]:
    """Random traffic while the broker is killed at each of ``points`` in turn.

    After each kill, the store must hold everything acknowledged; after the
    last restart every checker runs over the whole history.
    """
    for n in range(workers):
        fleet.spawn(f"w{n}", seed * 100 + n, "--ops", str(ops))
    durable = 0
    for round_, point in enumerate(points, start=1):
        wanted = workers * ops * round_ // (len(points) + 2)
        wait_for(
            lambda w=wanted: len(fleet.history()) >= w,
            60,
            f"{wanted} operations",
        )
        fleet.arm(point)
        assert fleet.broker.proc is not None
        fleet.broker.proc.wait(20)
        killed = time.monotonic()
        store = fleet.store_rows()
        durable += checkers.check_durable(fleet.history(), store, killed)
        fleet.restart_broker()
    scenario.settle(fleet)
    figures = scenario.check_all(fleet)
    return {**figures, "durable": durable, "kills": len(points)}


def test_acknowledged_changes_survive_kills_at_every_failpoint(
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Killed at any point of a commit, the broker loses nothing it acknowledged."""
    fleet = fleet_factory(lease_ms=3000)
    figures = crash_run(fleet, FAILPOINTS, seed=1)
    assert figures["durable"]


@pytest.mark.slow
@pytest.mark.parametrize("seed", long_seeds())
def test_long_crash_runs(fleet_factory: Callable[..., Fleet], seed: int) -> None:
    """The long form: more sessions and operations, each failpoint twice a seed."""
    fleet = fleet_factory(lease_ms=3000)
    figures = crash_run(fleet, FAILPOINTS * 2, seed, workers=6, ops=300)
    print(f"seed {seed}: {figures}")
