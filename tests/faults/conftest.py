"""Fixtures of the fault runs: fleets of real processes, and the seeds to run."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import Fleet

SEEDS_ENV = "FLEETBUS_FAULT_SEEDS"


def long_seeds(default: int = 20) -> list[int]:
    """Seeds of the long form: ``$FLEETBUS_FAULT_SEEDS`` of them (or a list)."""
    text = os.environ.get(SEEDS_ENV, "")
    if "," in text:
        return [int(part) for part in text.split(",") if part.strip()]
    return list(range(int(text) if text.strip() else default))


@pytest.fixture
def fleet_factory(short_tmp: Path) -> Iterator[Callable[..., Fleet]]:
    """Start fleets; every process of every one is reaped at teardown."""
    fleets: list[Fleet] = []

    def start(name: str = "f", **options: Any) -> Fleet:
        fleet = Fleet(short_tmp / name, **options)
        fleets.append(fleet)
        return fleet.start()

    yield start
    for fleet in fleets:
        fleet.close()
