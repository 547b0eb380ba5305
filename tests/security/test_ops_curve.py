"""The operating commands against a CURVE broker, as a remote machine runs them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from tests.security.conftest import CurveBroker, Keys

FLEETBUS = str(Path(sys.executable).parent / "fleetbus")


def run(
    broker: CurveBroker, cwd: Path, *args: str, client: str | None
) -> subprocess.CompletedProcess[str]:
    """``fleetbus ARGS`` with the broker's URL and ``client``'s keys, if any."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLEETBUS_SERVER_KEY", "FLEETBUS_CLIENT_KEY")
    }
    env["FLEETBUS_URL"] = broker.url
    if client is not None:
        env["FLEETBUS_SERVER_KEY"] = str(broker.keys.public("broker"))
        env["FLEETBUS_CLIENT_KEY"] = str(broker.keys.secret(client))
    return subprocess.run(
        [FLEETBUS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def checks(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    report: dict[str, Any] = orjson.loads(done.stdout)
    return {check["name"]: check for check in report["checks"]}


def test_doctor_and_status_work_with_admitted_keys(
    curve_broker: CurveBroker, short_tmp: Path
) -> None:
    """Any admitted key passes doctor; an operator's key reads the repository."""
    doctor = run(curve_broker, short_tmp, "doctor", "--json", client="alice")
    status = run(curve_broker, short_tmp, "status", "--json", client="op")

    found = checks(doctor)
    assert found["broker"]["status"] == "ok"
    assert found["socket"]["detail"].endswith("is encrypted with CURVE")
    assert status.returncode == 0, status.stderr
    assert orjson.loads(status.stdout)["broker"]["url"] == curve_broker.url


def test_status_of_a_repository_is_for_its_sessions_keys_and_operators(
    curve_broker: CurveBroker, short_tmp: Path
) -> None:
    """A key with no session in the repository, and no operator, reads nothing."""
    done = run(curve_broker, short_tmp, "status", client="alice")

    assert done.returncode == 1
    assert done.stderr == "fleetbus: this credential may not read that repository\n"


def test_doctor_points_at_the_keys_when_the_broker_is_silent(
    curve_broker: CurveBroker, keys: Keys, short_tmp: Path
) -> None:
    """A key not in the allow-list, or none, gets no answer: doctor names why."""
    refused = run(
        curve_broker, short_tmp, "doctor", "--json", "--timeout", "1", client="mallory"
    )
    plain = run(
        curve_broker, short_tmp, "doctor", "--json", "--timeout", "1", client=None
    )

    assert refused.returncode == 3
    assert "curve_allow directory" in checks(refused)["broker"]["detail"]
    assert plain.returncode == 3
    assert "FLEETBUS_CLIENT_KEY" in checks(plain)["broker"]["detail"]
