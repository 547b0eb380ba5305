"""The benchmark harness runs end to end and writes well-formed figures.

Nothing here judges speed: only that figures come out, as finite numbers with
a spread around them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_quick_local_scenario_writes_figures(tmp_path: Path) -> None:
    """One tiny scenario with a broker-free harness produces named figures."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--reps",
            "1",
            "--only",
            "decision",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    figures = doc["figures"]
    assert {"decision_p50_us_10", "decision_p50_us_100k", "decision_ratio"} <= set(
        figures
    )
    for name, value in figures.items():
        assert math.isfinite(value), name
        low, high = doc["spread"][name]
        assert low <= value <= high or math.isclose(low, high), name
    assert doc["env"]["cpu_count"] >= 1
    assert "decision 100k ≤ 1.5× decision 10" in doc["targets"]


@pytest.mark.timeout(120)
def test_quick_broker_scenario_writes_figures(tmp_path: Path) -> None:
    """A scenario with a real broker and subscriber processes yields figures."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--reps",
            "1",
            "--only",
            "fanout",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    figures = json.loads(out.read_text())["figures"]
    for name in (
        "fanout_100_deliveries_per_s",
        "proxy_fanout_100_deliveries_per_s",
        "fanout_ratio",
    ):
        assert figures[name] > 0, name
