"""Fixtures shared by every test: real broker processes on ipc sockets."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.brokerproc import BrokerProcess


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path (ipc socket paths are limited)."""
    path = Path(tempfile.mkdtemp(prefix="fb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def broker_factory(short_tmp: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Start brokers with chosen options; every one is stopped at teardown."""
    started: list[BrokerProcess] = []

    def start(name: str = "b", **options: Any) -> BrokerProcess:
        workdir = short_tmp / name
        workdir.mkdir()
        broker = BrokerProcess(workdir, **options)
        started.append(broker)
        return broker.start()

    yield start
    for broker in started:
        broker.kill()


@pytest.fixture
def broker(broker_factory: Callable[..., BrokerProcess]) -> BrokerProcess:
    """A broker with a one-second lease."""
    return broker_factory()
