"""What every scenario gets: the run's settings, a scratch folder, the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bench.stats import Report


@dataclass
class Run:
    """Settings of one run of the suite.

    ``quick`` scales counts and repetitions down to finish in about a minute
    on two cores; ``install_peers`` lets the run install missing peer servers.
    """

    quick: bool
    reps: int
    workdir: Path
    report: Report
    install_peers: bool = False

    def scale(self, quick: int, full: int) -> int:
        """``quick`` in a quick run, ``full`` otherwise."""
        return quick if self.quick else full

    def folder(self, name: str) -> Path:
        """A fresh scratch folder for one scenario (short: ipc paths are short)."""
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path
