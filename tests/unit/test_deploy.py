"""The files under ``deploy/`` agree with the broker and with each other."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fleetbus import config
from fleetbus.security import CLIENT_KEY_ENV, SERVER_KEY_ENV

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "fleetbus-broker.service"


def unit_settings() -> dict[str, list[str]]:
    """The unit's ``Key=value`` lines, every value of each key."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith(("#", "[")):
            settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the unit, with a real executable in it."""
    fleetbus = Path(sys.executable).parent / "fleetbus"
    unit = tmp_path / UNIT.name
    unit.write_text(
        UNIT.read_text().replace("/opt/fleetbus/bin/fleetbus", str(fleetbus))
    )

    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr


def test_unit_restarts_on_failure_but_not_on_a_bad_setting() -> None:
    """A crash restarts the broker; a config error (exit 2) does not loop."""
    settings = unit_settings()

    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == [str(config.ConfigError.exit_code)]


def test_unit_keeps_store_and_sockets_in_private_directories() -> None:
    """State and runtime directories are the service's own, mode 0700."""
    settings = unit_settings()

    assert settings["StateDirectoryMode"] == ["0700"]
    assert settings["RuntimeDirectoryMode"] == ["0700"]
    assert "FLEETBUS_DATA=%S/fleetbus" in settings["Environment"]
    assert "XDG_RUNTIME_DIR=%t" in settings["Environment"]
    assert settings["DynamicUser"] == ["yes"]


def test_sample_config_holds_only_known_settings() -> None:
    """``deploy/config.toml`` reads without error and names a fixed event port."""
    values = config.read_file(DEPLOY / "config.toml")

    assert values["url"].startswith("tcp://")
    assert values["pub_url"].startswith("tcp://")


def test_commented_curve_lines_name_real_settings(tmp_path: Path) -> None:
    """Uncommented, the sample's CURVE keys and compose's variables are known."""
    sample = (DEPLOY / "config.toml").read_text()
    enabled = tmp_path / "config.toml"
    enabled.write_text(re.sub(r"^# (curve_\w+ = )", r"\1", sample, flags=re.M))
    compose = (DEPLOY / "compose.yaml").read_text()
    known = {s.env for s in config.SETTINGS} | {SERVER_KEY_ENV, CLIENT_KEY_ENV}

    values = config.read_file(enabled)
    named = set(re.findall(r"^\s+# (FLEETBUS_\w+):", compose, re.M))

    assert {"curve_secret", "curve_allow", "curve_operators"} <= values.keys()
    assert named
    assert named <= known


def test_image_and_compose_keep_the_store_on_a_volume() -> None:
    """The image's data directory is a volume, and compose mounts a named one."""
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    compose = (DEPLOY / "compose.yaml").read_text()

    assert 'VOLUME ["/var/lib/fleetbus"]' in dockerfile
    assert "FLEETBUS_DATA=/var/lib/fleetbus" in dockerfile
    assert re.search(r"^\s+- fleetbus-data:/var/lib/fleetbus$", compose, re.M)
    assert re.search(r"^volumes:\n  fleetbus-data:$", compose, re.M)


def test_image_copies_what_the_package_build_reads() -> None:
    """The readme the build metadata names is copied into the image."""
    project = tomllib.loads((DEPLOY.parent / "pyproject.toml").read_text())
    dockerfile = (DEPLOY / "Dockerfile").read_text()

    copied = re.findall(r"^COPY (.+) /tmp/fleetbus/", dockerfile, re.M)

    assert project["project"]["readme"] in " ".join(copied).split()
    assert any(line.startswith("src") for line in copied)
