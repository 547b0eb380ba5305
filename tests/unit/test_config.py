"""Settings: precedence of flags, environment, file and defaults; bad values."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetbus import config
from fleetbus.broker.main import resolve


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_apply_when_nothing_is_given(tmp_path: Path) -> None:
    """With no file, no variable and no flag every setting has its default."""
    resolved = config.load({}, environ={"XDG_CONFIG_HOME": str(tmp_path)})

    assert resolved["lease_ms"] == 5000
    assert resolved["log_level"] == "info"
    assert resolved["metrics"] is None
    assert resolved.file is None
    assert set(resolved.sources.values()) == {"default"}


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    """Each layer overrides the ones below it, key by key."""
    file = write(
        tmp_path / "c.toml",
        'lease_ms = 2000\nheartbeat_ms = 300\nmax_batch = 16\nlog_level = "debug"\n',
    )
    env = {"FLEETBUS_LEASE_MS": "3000", "FLEETBUS_HEARTBEAT_MS": "400"}

    resolved = config.load({"lease_ms": 4000, "fsync": None}, config=file, environ=env)

    assert resolved["lease_ms"] == 4000
    assert resolved.sources["lease_ms"] == "flag"
    assert resolved["heartbeat_ms"] == 400
    assert resolved.sources["heartbeat_ms"] == "env"
    assert resolved["max_batch"] == 16
    assert resolved.sources["max_batch"] == f"file {file}"
    assert resolved["log_level"] == "debug"
    assert resolved["fsync"] is False
    assert resolved.sources["fsync"] == "default"


def test_user_config_file_is_found_under_xdg_config_home(tmp_path: Path) -> None:
    """The per-user file is read when present, without being named."""
    (tmp_path / "fleetbus").mkdir()
    write(tmp_path / "fleetbus" / "config.toml", "grace_ms = 0\n")

    resolved = config.load({}, environ={"XDG_CONFIG_HOME": str(tmp_path)})

    assert resolved["grace_ms"] == 0
    assert resolved.file == tmp_path / "fleetbus" / "config.toml"


def test_fleetbus_config_variable_names_the_file(tmp_path: Path) -> None:
    """``$FLEETBUS_CONFIG`` names a file, which then must exist."""
    file = write(tmp_path / "x.toml", 'metrics = "127.0.0.1:9464"\n')

    resolved = config.load({}, environ={"FLEETBUS_CONFIG": str(file)})
    assert resolved["metrics"] == "127.0.0.1:9464"

    with pytest.raises(config.ConfigError, match="no such file"):
        config.load({}, environ={"FLEETBUS_CONFIG": str(tmp_path / "missing")})


def test_env_booleans_and_paths_are_parsed(tmp_path: Path) -> None:
    """Variables are text: booleans take the usual words, paths expand ``~``."""
    env = {
        "FLEETBUS_FSYNC": "yes",
        "FLEETBUS_LOG_JSON": "0",
        "FLEETBUS_DATA": "~/fb",
        "FLEETBUS_LOG": "WARNING",
    }

    resolved = config.load({}, environ=env)

    assert resolved["fsync"] is True
    assert resolved["log_json"] is False
    assert resolved["data"] == Path.home() / "fb"
    assert resolved["log_level"] == "warning"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lease = 1\n", "config file .*: unknown key 'lease' \\(known: "),
        ('lease_ms = "5s"\n', "'lease_ms' must be an integer, not the string '5s'"),
        ("lease_ms = 99\n", "'lease_ms' must be at least 100, not 99"),
        ("max_batch = 100000\n", "'max_batch' must be at most 65536"),
        ("fsync = 1\n", "'fsync' must be true or false, not int 1"),
        ('url = "http://x"\n', "'url' must start with ipc:// or tcp://"),
        ('metrics = "9464"\n', "'metrics' must be HOST:PORT, not '9464'"),
        ('log_level = "loud"\n', "'log_level' must be one of debug, info"),
        ("lease_ms = \n", "not valid TOML"),
    ],
)
def test_bad_file_values_are_named_in_one_line(
    tmp_path: Path, text: str, message: str
) -> None:
    """Unknown keys, wrong types and values out of range name key and file."""
    file = write(tmp_path / "c.toml", text)

    with pytest.raises(config.ConfigError, match=message) as caught:
        config.load({}, config=file, environ={})

    assert "\n" not in caught.value.message
    assert caught.value.exit_code == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"FLEETBUS_LEASE_MS": "abc"}, "FLEETBUS_LEASE_MS must be an integer"),
        ({"FLEETBUS_LEASE_MS": "1"}, "FLEETBUS_LEASE_MS must be at least 100"),
        ({"FLEETBUS_FSYNC": "maybe"}, "FLEETBUS_FSYNC must be true or false"),
        ({"FLEETBUS_URL": "nats://x"}, "FLEETBUS_URL must start with ipc://"),
        ({"FLEETBUS_URL": "tcp://h:99999"}, "FLEETBUS_URL must be tcp://HOST:PORT"),
        ({"FLEETBUS_URL": "tcp://h"}, "FLEETBUS_URL must be tcp://HOST:PORT"),
    ],
)
def test_bad_env_values_name_the_variable(env: dict[str, str], message: str) -> None:
    """A bad variable is reported under its own name."""
    with pytest.raises(config.ConfigError, match=message):
        config.load({}, environ=env)


def test_bad_flag_values_name_the_flag() -> None:
    """A flag out of range is reported as the flag."""
    with pytest.raises(config.ConfigError, match="--grace-ms must be at least 0"):
        config.load({"grace_ms": -1}, environ={})


def test_hostport_accepts_ipv6_in_brackets() -> None:
    """``[::1]:9464`` is host ``::1``, port 9464."""
    assert config.split_hostport("[::1]:9464") == ("::1", 9464)
    assert config.split_hostport("0.0.0.0:0") == ("0.0.0.0", 0)


def test_broker_settings_map_onto_the_broker_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker's flags, env and file end up in its ``BrokerConfig``."""
    file = write(tmp_path / "c.toml", f'data = "{tmp_path}/d"\nfsync = true\n')
    monkeypatch.setenv("FLEETBUS_METRICS", "127.0.0.1:0")
    monkeypatch.setenv("FLEETBUS_URL", f"ipc://{tmp_path}/s")

    broker = resolve(["--config", str(file), "--lease-ms", "700", "--no-log-json"])

    assert broker.url == f"ipc://{tmp_path}/s"
    assert broker.data_dir == tmp_path / "d"
    assert broker.synchronous == "FULL"
    assert broker.lease_ms == 700
    assert broker.log_json is False
    assert broker.metrics == "127.0.0.1:0"
    assert broker.grace_s == 0.7


def test_broker_exits_2_with_one_line_on_bad_config(tmp_path: Path) -> None:
    """A bad setting stops the broker before it binds anything."""
    file = write(tmp_path / "c.toml", "lease_ms = -5\n")

    done = subprocess.run(
        [sys.executable, "-m", "fleetbus.broker", "--config", str(file)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fleetbus broker: config file {file}: 'lease_ms' must be at least 100, not -5"
    ]
