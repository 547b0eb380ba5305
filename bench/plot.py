"""Charts of a run's figures: ``python -m bench.plot FIGURES.json OUTDIR``.

Needs matplotlib (the ``bench`` extra); draws each target's figure against
its bound, the round trips next to their baselines with p25–p75 bars, the
replica's check and the broker's decision against the number of claims held,
and claim + release pairs per second against the number of sessions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    """Draw the charts of one JSON file of figures into a folder."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (the bench extra)", file=sys.stderr)
        return 1
    doc = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    _round_trips(plt, doc, out / "bench-rtt.png")
    _targets(plt, doc, out / "bench-targets.png")
    _claims_held(plt, doc, out / "bench-claims-held.png")
    _sessions(plt, doc, out / "bench-sessions.png")
    return 0


def _bars(ax: Any, doc: dict[str, Any], names: list[str], labels: list[str]) -> None:
    figures, spread = doc["figures"], doc["spread"]
    shown = [(n, lab) for n, lab in zip(names, labels, strict=True) if n in figures]
    values = [figures[n] for n, _ in shown]
    low = [figures[n] - spread[n][0] for n, _ in shown]
    high = [spread[n][1] - figures[n] for n, _ in shown]
    ax.barh([lab for _, lab in shown], values, xerr=[low, high], color="#4878a8")
    ax.invert_yaxis()


def _round_trips(plt: Any, doc: dict[str, Any], path: Path) -> None:
    names = [
        "echo_rtt_sync_p50_us",
        "echo_rtt_async_p50_us",
        "redis_rtt_p50_us",
        "nats_rtt_p50_us",
        "claim_rtt_p50_us",
    ]
    labels = [
        "pyzmq echo (sync)",
        "pyzmq echo (asyncio)",
        "Redis SET NX PX",
        "NATS request/reply",
        "fleetbus claim (SDK)",
    ]
    fig, ax = plt.subplots(figsize=(7, 3))
    _bars(ax, doc, names, labels)
    ax.set_xlabel("round trip p50, µs (split placement; bars: p25–p75)")
    _save(plt, fig, path)


def _targets(plt: Any, doc: dict[str, Any], path: Path) -> None:
    rows = [
        (what, t["figure"], t["op"], t["bound"])
        for what, t in doc["targets"].items()
        if t["figure"] in doc["figures"]
    ]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1))
    # Each figure as a share of its bound, oriented so that right of 1 is met.
    shares = []
    for _what, name, op, bound in rows:
        value = doc["figures"][name]
        shares.append(value / bound if op == ">=" else bound / max(value, 1e-12))
    colors = ["#4a9a5b" if s >= 1 else "#c0504d" for s in shares]
    ax.barh([r[0] for r in rows], shares, color=colors)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_xlabel("share of the target (≥ 1: met; log scale)")
    ax.invert_yaxis()
    _save(plt, fig, path)


def _claims_held(plt: Any, doc: dict[str, Any], path: Path) -> None:
    figures = doc["figures"]
    sizes = [
        (10, "10"),
        (100, "100"),
        (1_000, "1k"),
        (10_000, "10k"),
        (100_000, "100k"),
    ]
    series = []
    for prefix, label in (
        ("local_check_p50_us_", "replica: may_edit"),
        ("decision_p50_us_", "broker: claim decision"),
    ):
        points = [
            (n, f"{prefix}{tag}") for n, tag in sizes if f"{prefix}{tag}" in figures
        ]
        if points:
            series.append((label, points))
    if not series:
        return
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for label, points in series:
        _errorbar(ax, doc, points, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("claims held")
    ax.set_ylabel("p50, µs (in process)")
    ax.legend()
    _save(plt, fig, path)


def _sessions(plt: Any, doc: dict[str, Any], path: Path) -> None:
    figures = doc["figures"]
    prefix = "claim_release_per_s_sessions_"
    names = {int(k.removeprefix(prefix)): k for k in figures if k.startswith(prefix)}
    if "claim_release_per_s" in figures:
        names[20] = "claim_release_per_s"
    if len(names) < 2:
        return
    xs = sorted(names)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    _errorbar(ax, doc, [(n, names[n]) for n in xs], label="fleetbus")
    ceiling = "echo_claim_release_per_s"
    if ceiling in figures:
        _errorbar(ax, doc, [(20, ceiling)], label="same client, echo for a broker")
        ax.axhline(20_000, color="grey", linestyle=":", label="target at 20 sessions")
        ax.legend()
    ax.set_xscale("log")
    ax.set_xticks(xs, [str(n) for n in xs])
    ax.xaxis.set_minor_formatter(plt.NullFormatter())
    ax.set_ylim(bottom=0)
    ax.set_xlabel("SDK sessions, claiming and releasing their own files")
    ax.set_ylabel("pairs per second")
    _save(plt, fig, path)


def _errorbar(
    ax: Any, doc: dict[str, Any], points: list[tuple[int, str]], **style: Any
) -> None:
    """One series of (x, figure name) with its p25–p75 spread as bars."""
    figures, spread = doc["figures"], doc["spread"]
    ys = [figures[name] for _, name in points]
    low = [figures[name] - spread[name][0] for _, name in points]
    high = [spread[name][1] - figures[name] for _, name in points]
    xs = [x for x, _ in points]
    ax.errorbar(xs, ys, yerr=[low, high], marker="o", capsize=3, **style)


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
