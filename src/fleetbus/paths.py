"""Where fleetbus keeps its socket and its data by default.

The local default needs no configuration: an ``ipc://`` socket in a private
runtime directory of the user, and SQLite state in the user's data directory.
"""

from __future__ import annotations

import os
from pathlib import Path

URL_ENV = "FLEETBUS_URL"
DATA_ENV = "FLEETBUS_DATA"


def runtime_dir() -> Path:
    """A directory only this user can enter, for sockets."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    path = Path(base) / "fleetbus" if base else Path(f"/tmp/fleetbus-{os.getuid()}")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def data_dir() -> Path:
    """The broker's data directory: ``FLEETBUS_DATA``, else the user's."""
    explicit = os.environ.get(DATA_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "fleetbus"


def default_url() -> str:
    """The broker URL: ``FLEETBUS_URL``, else the local ipc socket."""
    return os.environ.get(URL_ENV) or f"ipc://{runtime_dir() / 'broker.sock'}"


def resolve_url(url: str | None) -> str:
    """An explicit URL, else the default."""
    return url or default_url()
