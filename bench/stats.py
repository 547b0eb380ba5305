"""Figures: medians, spreads and pairwise ratios over repetitions."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def quantile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by linear interpolation."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    if len(ordered) == 1:
        return float(ordered[0])
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (pos - low))


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p25, p50, p75 and p99 of one sample set."""
    return {
        "p25": quantile(values, 0.25),
        "p50": quantile(values, 0.5),
        "p75": quantile(values, 0.75),
        "p99": quantile(values, 0.99),
    }


@dataclass
class Report:
    """Everything one run measured, in the shape the JSON file takes.

    ``figures`` maps a stable name to the median over repetitions; ``spread``
    maps the same name to its p25 and p75 over repetitions; ``reps`` to the
    number of repetitions. ``not_measured`` gives the reason a figure is
    missing, and ``notes`` says how a figure was taken (placement, scale).
    """

    figures: dict[str, float] = field(default_factory=dict)
    spread: dict[str, list[float]] = field(default_factory=dict)
    reps: dict[str, int] = field(default_factory=dict)
    units: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    not_measured: dict[str, str] = field(default_factory=dict)
    targets: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, per_rep: Iterable[float], unit: str) -> None:
        """Record a figure from its value in each repetition."""
        values = [float(v) for v in per_rep]
        if not values:
            self.not_measured[name] = "no repetition produced a value"
            return
        self.figures[name] = statistics.median(values)
        self.spread[name] = [quantile(values, 0.25), quantile(values, 0.75)]
        self.reps[name] = len(values)
        self.units[name] = unit
        self.not_measured.pop(name, None)

    def ratio(
        self, name: str, numerators: Sequence[float], denominators: Sequence[float]
    ) -> None:
        """Record the ratio of two figures, pair by pair over repetitions."""
        pairs = [n / d for n, d in zip(numerators, denominators, strict=True) if d]
        self.add(name, pairs, "x")

    def missing(self, name: str, reason: str) -> None:
        """Say that a figure was not measured, and why."""
        if name not in self.figures:
            self.not_measured[name] = reason

    def note(self, name: str, text: str) -> None:
        """Say how a figure was taken."""
        self.notes[name] = text

    def target(self, name: str, op: str, bound: float, what: str) -> None:
        """Judge a figure against its target: ``op`` is ``<=`` or ``>=``."""
        value = self.figures.get(name)
        met: bool | None = None
        if value is not None:
            met = value <= bound if op == "<=" else value >= bound
        self.targets[what] = {"figure": name, "op": op, "bound": bound, "met": met}

    def to_json(self) -> dict[str, Any]:
        """The JSON document of the run."""
        return {
            "figures": self.figures,
            "spread": self.spread,
            "reps": self.reps,
            "units": self.units,
            "notes": self.notes,
            "not_measured": self.not_measured,
            "targets": self.targets,
            "env": self.env,
        }
