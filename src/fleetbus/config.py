"""Settings from a TOML file, the environment and flags, in that rising order.

Every setting is declared once in :data:`SETTINGS`: its key in the file, its
environment variable, its type, its default and its range. :func:`load`
resolves them with **flags > environment > file > defaults** and checks each
value wherever it came from, so a mistake is reported as one line naming the
source (``config file /etc/fleetbus.toml: 'lease_ms' must be at least 100``).

The file is ``--config PATH``, else ``$FLEETBUS_CONFIG``, else
``$XDG_CONFIG_HOME/fleetbus/config.toml`` (``~/.config/fleetbus/config.toml``)
when it exists.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetbus.errors import BadInput

CONFIG_ENV = "FLEETBUS_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_URL_SCHEMES = ("ipc://", "tcp://")


class ConfigError(BadInput):
    """A setting is unknown, of the wrong type or out of range."""

    code = "config"
    exit_code = 2


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: where it is read from and what values it takes.

    ``kind`` is one of ``str``, ``int``, ``bool``, ``path``, ``url``,
    ``hostport`` or ``level``. A ``None`` default means "not set": the consumer
    derives a value (the default socket, one lease of grace).
    """

    key: str
    kind: str
    default: Any
    help: str
    minimum: int | None = None
    maximum: int | None = None

    @property
    def env(self) -> str:
        """The environment variable that sets it."""
        return _ENV_NAMES.get(self.key, "FLEETBUS_" + self.key.upper())

    @property
    def flag(self) -> str:
        """The command-line flag that sets it."""
        return "--" + self.key.replace("_", "-")


_ENV_NAMES = {"log_level": "FLEETBUS_LOG"}

SETTINGS: tuple[Setting, ...] = (
    Setting("url", "url", None, "control socket, ipc://PATH or tcp://HOST:PORT"),
    Setting("pub_url", "url", None, "event socket (default: derived from url)"),
    Setting("data", "path", None, "data directory of the broker"),
    Setting("lease_ms", "int", 5000, "session lease", 100, 3_600_000),
    Setting("grace_ms", "int", None, "reconnect time after a restart", 0, 86_400_000),
    Setting("heartbeat_ms", "int", 1000, "claims-stream heartbeat period", 50, 60_000),
    Setting("max_batch", "int", 256, "requests applied per commit", 1, 65_536),
    Setting("pub_hwm", "int", 100_000, "events queued per subscriber", 10, 10**8),
    Setting("fsync", "bool", False, "sync the store to disk at every commit"),
    Setting("metrics", "hostport", None, "serve Prometheus metrics on HOST:PORT"),
    Setting("facts_max", "int", 100_000, "facts retained per repository", 1, 10**8),
    Setting(
        "facts_max_age_s", "int", 30 * 86_400, "longest a fact is retained", 1, 10**10
    ),
    Setting(
        "request_memory_s",
        "int",
        600,
        "how long replies are kept for retries",
        1,
        86_400,
    ),
    Setting(
        "rate_per_s", "int", 10_000, "requests a second per session (0: any)", 0, 10**7
    ),
    Setting("rate_burst", "int", 20_000, "burst of requests per peer", 1, 10**8),
    Setting("curve_secret", "path", None, "the broker's CURVE secret key file"),
    Setting("curve_allow", "path", None, "directory of admitted client keys"),
    Setting("curve_operators", "path", None, "directory of operator keys"),
    Setting("local_operator", "bool", True, "the local user may force-release"),
    Setting("cross_repo", "bool", False, "any credential may read every repo"),
    Setting("log_level", "level", "info", "debug, info, warning or error"),
    Setting("log_json", "bool", None, "JSON log lines (default: off a terminal)"),
)

BY_KEY: dict[str, Setting] = {s.key: s for s in SETTINGS}


@dataclass(slots=True)
class Resolved:
    """The effective settings and where each came from."""

    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    file: Path | None = None

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def default_path(environ: Mapping[str, str]) -> Path:
    """The per-user config file, whether or not it exists."""
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "fleetbus" / "config.toml"


def find_file(explicit: Path | None, environ: Mapping[str, str]) -> Path | None:
    """The config file to read, if any.

    A file named by ``--config`` or ``$FLEETBUS_CONFIG`` must exist; the
    per-user default is read only when present.
    """
    if explicit is not None:
        return explicit
    named = environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    fallback = default_path(environ)
    return fallback if fallback.is_file() else None


def read_file(path: Path) -> dict[str, Any]:
    """The settings of one TOML file, checked; :class:`ConfigError` if wrong."""
    where = f"config file {path}"
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read it: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML: {exc}") from exc
    values: dict[str, Any] = {}
    for key, value in raw.items():
        setting = BY_KEY.get(key)
        if setting is None:
            known = ", ".join(sorted(BY_KEY))
            raise ConfigError(f"{where}: unknown key {key!r} (known: {known})")
        values[key] = check(setting, value, where)
    return values


def read_env(environ: Mapping[str, str]) -> dict[str, Any]:
    """The settings given by ``FLEETBUS_*`` variables, parsed and checked."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text = environ.get(setting.env)
        if text is None or text == "":
            continue
        values[setting.key] = check(setting, _from_text(setting, text), setting.env)
    return values


def load(
    flags: Mapping[str, Any] | None = None,
    *,
    config: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Resolve every setting: flags (those not ``None``) > env > file > default."""
    env = os.environ if environ is None else environ
    path = find_file(config, env)
    layers: list[tuple[str, dict[str, Any]]] = [
        ("default", {s.key: s.default for s in SETTINGS})
    ]
    if path is not None:
        layers.append((f"file {path}", read_file(path)))
    layers.append(("env", read_env(env)))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    for key, value in given.items():
        setting = BY_KEY.get(key)
        if setting is None:
            raise ConfigError(f"unknown setting {key!r}")
        given[key] = check(setting, value, setting.flag)
    layers.append(("flag", given))
    resolved = Resolved(values={}, file=path)
    for source, values in layers:
        for key, value in values.items():
            resolved.values[key] = value
            resolved.sources[key] = source
    return resolved


def check(setting: Setting, value: Any, where: str) -> Any:
    """``value`` if it suits ``setting``, normalised; else :class:`ConfigError`."""
    name = f"{where}: {setting.key!r}" if where.startswith("config") else where
    kind = setting.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, not {_shown(value)}")
        return value
    if kind == "int":
        return _check_int(setting, value, name)
    if isinstance(value, Path) and kind == "path":
        return value
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{name} must be a non-empty string, not {_shown(value)}")
    if kind == "path":
        return Path(value).expanduser()
    if kind == "url" and not value.startswith(_URL_SCHEMES):
        raise ConfigError(f"{name} must start with ipc:// or tcp://, not {value!r}")
    if kind == "url" and value.startswith("tcp://") and not value.endswith(":*"):
        _check_tcp(value, name)
    if kind == "level":
        if value.lower() not in LOG_LEVELS:
            raise ConfigError(f"{name} must be one of {', '.join(LOG_LEVELS)}")
        return value.lower()
    if kind == "hostport":
        split_hostport(value, name)
    return value


def _check_tcp(url: str, name: str) -> None:
    try:
        split_hostport(url.removeprefix("tcp://"), name)
    except ConfigError:
        # libzmq would silently take port 99999 as 34463.
        raise ConfigError(
            f"{name} must be tcp://HOST:PORT, the port 0 to 65535, not {url!r}"
        ) from None


def split_hostport(text: str, name: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as a host and a port number."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or int(port) > 65_535:
        raise ConfigError(f"{name} must be HOST:PORT, not {text!r}")
    return host, int(port)


def _check_int(setting: Setting, value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer, not {_shown(value)}")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{name} must be at least {setting.minimum}, not {value}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(f"{name} must be at most {setting.maximum}, not {value}")
    return value


def _from_text(setting: Setting, text: str) -> Any:
    """An environment variable's text in the setting's type, when it has one."""
    if setting.kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{setting.env} must be true or false, not {text!r}")
    if setting.kind == "int":
        try:
            return int(text.strip())
        except ValueError:
            raise ConfigError(
                f"{setting.env} must be an integer, not {text!r}"
            ) from None
    return text


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{type(value).__name__} {value!r}"
