"""Compiled bytecode for the modules every hook process imports.

An agent runs ``fleetbus hook …`` on every tool call. Python compiles a module
it imports unless a current ``.pyc`` is cached; with ``PYTHONDONTWRITEBYTECODE``
set (as some agents and containers do) or an editable install whose source no
import has cached yet, every hook compiles the hook path again, several
milliseconds each time. The sidecar, which lives as long as the agent session,
writes the cache for those modules once when it starts, whatever the
environment says about writing it, where the hook's own Python will look
(``sys.pycache_prefix`` included).
"""

from __future__ import annotations

import importlib.util
import os
import py_compile
from collections.abc import Iterable

#: The modules ``fleetbus hook`` imports on its short way to the sidecar.
HOOK_MODULES = (
    "fleetbus",
    "fleetbus.entry",
    "fleetbus.agents",
    "fleetbus.agents.hookclient",
)

_HEADER = 16


def cache_bytecode(modules: Iterable[str] = HOOK_MODULES) -> list[str]:
    """Write a current timestamp ``.pyc`` for each of ``modules`` that lacks one.

    Returns the names of the modules written. A module whose cache is current,
    or hash-based, is left alone; one whose source cannot be found, or whose
    cache cannot be written (a read-only install), is skipped: the hook then
    compiles it as before.
    """
    written = []
    for name in modules:
        source = _source(name)
        if source is None:
            continue
        cached = importlib.util.cache_from_source(source)
        if _current(source, cached):
            continue
        try:
            py_compile.compile(
                source,
                cfile=cached,
                doraise=True,
                invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP,
            )
        except (OSError, py_compile.PyCompileError):
            continue
        written.append(name)
    return written


def _source(name: str) -> str | None:
    """The ``.py`` file of module ``name``, if it has one."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    origin = spec.origin if spec is not None else None
    if origin is None or not origin.endswith(".py"):
        return None
    return origin


def _current(source: str, cached: str) -> bool:
    """Whether ``cached`` is a ``.pyc`` the import system takes for ``source``."""
    try:
        stat = os.stat(source)
        with open(cached, "rb") as handle:
            header = handle.read(_HEADER)
    except OSError:
        return False
    if len(header) < _HEADER or header[:4] != importlib.util.MAGIC_NUMBER:
        return False
    if int.from_bytes(header[4:8], "little") != 0:
        return True
    mtime = int(stat.st_mtime) & 0xFFFFFFFF
    size = stat.st_size & 0xFFFFFFFF
    return (
        int.from_bytes(header[8:12], "little") == mtime
        and int.from_bytes(header[12:16], "little") == size
    )
