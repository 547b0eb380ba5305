"""The baseline claim guard: a JSON-lines file read by a fresh process per check."""

from __future__ import annotations

import json
from pathlib import Path

from bench.context import Run
from bench.harness import PYTHON, run_timed
from bench.local import scope_text
from bench.stats import quantile

SCRIPT = str(Path(__file__).with_name("jsonguard.py"))


def run(ctx: Run) -> None:
    """Process start to exit of one check with 10 to 10,000 claims in the file."""
    folder = ctx.folder("guard")
    sizes = [10, 1_000] if ctx.quick else [10, 1_000, 10_000]
    rounds = ctx.scale(8, 20)
    files = {size: _write(folder / f"claims-{size}.jsonl", size) for size in sizes}
    per_size: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(ctx.reps):
        times: dict[int, list[float]] = {size: [] for size in sizes}
        for _ in range(rounds):
            for size, path in files.items():
                times[size].append(
                    run_timed([PYTHON, SCRIPT, str(path), "pkg1/mod0/free.py", "me"])
                )
        for size in sizes:
            per_size[size].append(quantile(times[size], 0.5))
    for size, p50s in per_size.items():
        name = f"jsonl_guard_p50_ms_{size}"
        ctx.report.add(name, p50s, "ms")
        ctx.report.note(
            name, f"fresh python per check, {size:,} claims, fnmatch patterns"
        )


def _write(path: Path, count: int) -> Path:
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps({"sid": f"s{i % 50}", "scope": scope_text(i)}) + "\n")
    return path
