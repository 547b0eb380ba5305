"""The targets, and the table the suite prints."""

from __future__ import annotations

from bench.stats import Report

# (what, figure, op, bound)
TARGETS = [
    ("claim p50 ≤ 1.5× asyncio echo", "claim_rtt_p50_ratio", "<=", 1.5),
    ("claim p99 ≤ 3× asyncio echo", "claim_rtt_p99_ratio", "<=", 3.0),
    ("claim+release ≥ 20,000/s (20 sessions)", "claim_release_per_s", ">=", 20_000),
    ("facts ≥ 50,000/s (10 publishers)", "facts_per_s", ">=", 50_000),
    ("fan-out ≥ 0.5× zmq.proxy (100 subs)", "fanout_ratio", ">=", 0.5),
    ("may_edit ≤ 5 µs p50 (10k claims)", "local_check_p50_us_10k", "<=", 5.0),
    ("may_edit flat 10 → 100k (≤ 1.5×)", "local_check_flatness", "<=", 1.5),
    ("decision 100k ≤ 1.5× decision 10", "decision_ratio", "<=", 1.5),
    ("hook p50 ≤ 2× python -c pass", "hook_ratio", "<=", 2.0),
    ("join snapshot ≤ 50 ms", "join_snapshot_ms", "<=", 50.0),
    ("broker RSS ≤ 512 MiB", "broker_rss_mib", "<=", 512.0),
    ("broker restart ≤ 2 s", "restart_s", "<=", 2.0),
]


def judge(report: Report) -> None:
    """Judge every figure that has a target."""
    for what, name, op, bound in TARGETS:
        report.target(name, op, bound, what)
        if name not in report.figures and name not in report.not_measured:
            report.missing(name, "its scenario did not run")


def _fmt(value: float) -> str:
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render(report: Report) -> str:
    """Figures, then targets, as plain-text tables."""
    lines = [f"{'figure':<44} {'median':>12} {'p25–p75':>23} {'unit':>5}"]
    for name in sorted(report.figures):
        low, high = report.spread[name]
        spread = f"{_fmt(low)}–{_fmt(high)}"
        lines.append(
            f"{name:<44} {_fmt(report.figures[name]):>12} {spread:>23} "
            f"{report.units.get(name, ''):>5}"
        )
    for name, reason in sorted(report.not_measured.items()):
        lines.append(f"{name:<44} {'not measured':>12}  {reason}")
    lines.append("")
    lines.append(f"{'target':<44} {'value':>12}  verdict")
    for what, verdict in report.targets.items():
        value = report.figures.get(verdict["figure"])
        shown = _fmt(value) if value is not None else "—"
        met = verdict["met"]
        word = "not measured" if met is None else ("met" if met else "missed")
        lines.append(f"{what:<44} {shown:>12}  {word}")
    return "\n".join(lines)


def markdown(data: dict[str, object]) -> str:
    """The targets and every figure of a JSON report, as Markdown tables."""
    figures: dict[str, float] = data["figures"]  # type: ignore[assignment]
    spread: dict[str, list[float]] = data["spread"]  # type: ignore[assignment]
    units: dict[str, str] = data["units"]  # type: ignore[assignment]
    targets: dict[str, dict[str, object]] = data["targets"]  # type: ignore[assignment]
    missing: dict[str, str] = data["not_measured"]  # type: ignore[assignment]
    lines = ["| target | figure | verdict |", "|---|---:|---|"]
    for what, verdict in targets.items():
        value = figures.get(str(verdict["figure"]))
        shown = _fmt(value) if value is not None else "—"
        met = verdict["met"]
        word = "not measured" if met is None else ("met" if met else "**missed**")
        lines.append(f"| {what} | {shown} | {word} |")
    lines += ["", "| figure | median | p25–p75 | unit |", "|---|---:|---:|---|"]
    for name in sorted(figures):
        low, high = spread[name]
        lines.append(
            f"| `{name}` | {_fmt(figures[name])} | {_fmt(low)}–{_fmt(high)} "
            f"| {units.get(name, '')} |"
        )
    for name, reason in sorted(missing.items()):
        lines.append(f"| `{name}` | not measured | {reason} | |")
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys
    from pathlib import Path

    print(markdown(json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))))
