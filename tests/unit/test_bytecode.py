"""The sidecar's bytecode cache for the hook path, on a package of its own."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetbus.agents.bytecode import HOOK_MODULES, cache_bytecode


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A package ``bcpkg`` with one module ``mod``, importable from ``tmp_path``.

    Its bytecode goes to its own ``__pycache__``, whatever the environment says.
    """
    monkeypatch.setattr(sys, "pycache_prefix", None)
    root = tmp_path / "bcpkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "mod.py").write_text("VALUE = 1\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield root
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("bcpkg.mod", "bcpkg"):
            sys.modules.pop(name, None)


def _cached(source: Path) -> Path:
    return Path(importlib.util.cache_from_source(str(source)))


def test_writes_missing_bytecode_once(package: Path) -> None:
    source = package / "mod.py"

    first = cache_bytecode(["bcpkg", "bcpkg.mod"])
    second = cache_bytecode(["bcpkg", "bcpkg.mod"])

    assert first == ["bcpkg", "bcpkg.mod"]
    assert second == []
    header = _cached(source).read_bytes()[:16]
    assert header[:4] == importlib.util.MAGIC_NUMBER
    assert int.from_bytes(header[12:16], "little") == source.stat().st_size


def test_rewrites_bytecode_of_a_changed_source(package: Path) -> None:
    source = package / "mod.py"
    cache_bytecode(["bcpkg.mod"])
    stamp = source.stat().st_mtime
    source.write_text("VALUE = 22\n")
    os.utime(source, (stamp + 10, stamp + 10))

    assert cache_bytecode(["bcpkg.mod"]) == ["bcpkg.mod"]
    header = _cached(source).read_bytes()[:16]
    assert int.from_bytes(header[8:12], "little") == int(stamp + 10)


def test_unwritable_cache_and_unknown_modules_are_skipped(package: Path) -> None:
    cache = package / "__pycache__"
    cache.write_text("not a directory")

    assert cache_bytecode(["bcpkg.mod", "bcpkg.nothing", "no_such_pkg.x"]) == []
    assert cache.read_text() == "not a directory"


def test_hook_modules_are_the_installed_hook_path() -> None:
    for name in HOOK_MODULES:
        spec = importlib.util.find_spec(name)
        assert spec is not None, name
        assert str(spec.origin).endswith(".py"), name
