"""Redis and NATS as peers: servers started here, driven from Python.

A peer is measured only when its server binary and its Python client are both
present; otherwise :func:`why_missing` says what is missing and the figures
are reported as not measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.children import MAX_LIFE_S, say
from bench.harness import pin_pid

PAYLOAD = b"x" * 200


def why_missing(peer: str) -> str | None:
    """Why ``peer`` (``redis`` or ``nats``) cannot be measured, or None."""
    binary = {"redis": "redis-server", "nats": "nats-server"}[peer]
    module = {"redis": "redis", "nats": "nats"}[peer]
    if shutil.which(binary) is None:
        return f"{binary} is not installed"
    try:
        __import__(module)
    except ImportError:
        return f"the Python package for {peer} is not installed (bench extra)"
    return None


def install(peers: list[str]) -> str:
    """Install the servers of ``peers`` with apt-get; what happened, in words."""
    packages = [
        {"redis": "redis-server", "nats": "nats-server"}[p]
        for p in peers
        if shutil.which({"redis": "redis-server", "nats": "nats-server"}[p]) is None
    ]
    if not packages:
        return "already installed"
    if shutil.which("apt-get") is None:
        return "no apt-get here"
    for command in (["install"], ["update"], ["install"]):
        # A fresh machine may know no package lists yet: update, then again.
        done = subprocess.run(
            ["apt-get", *command, "-y", "-qq"]
            + (packages if command == ["install"] else []),
            capture_output=True,
            check=False,
            timeout=600,
        )
        if command == ["install"] and done.returncode == 0:
            return f"installed {', '.join(packages)}"
    return f"apt-get could not install {', '.join(packages)}"


def free_port() -> int:
    """A loopback TCP port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_connectable(connect: Any, what: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            connect()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} did not start")


@contextlib.contextmanager
def redis_server(workdir: Path, cpuset: set[int] | None) -> Iterator[str]:
    """A private redis-server on a unix socket; yields the socket path."""
    path = workdir / "redis.sock"
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            "0",
            "--unixsocket",
            str(path),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def probe() -> None:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))

        _wait_connectable(probe, "redis-server")
        pin_pid(proc.pid, cpuset)
        yield str(path)
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def nats_server(cpuset: set[int] | None) -> Iterator[str]:
    """A private nats-server on loopback; yields its URL."""
    port = free_port()
    proc = subprocess.Popen(
        ["nats-server", "-a", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_connectable(
            lambda: socket.create_connection(("127.0.0.1", port), 1).close(),
            "nats-server",
        )
        pin_pid(proc.pid, cpuset)
        yield f"nats://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


# -- children ------------------------------------------------------------------


def nats_responder(url: str, subject: str) -> None:
    """Answer every request on ``subject`` with its own payload."""

    async def serve() -> None:
        import nats

        nc = await nats.connect(url)

        async def reply(msg: Any) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(subject, cb=reply)
        await nc.flush()
        say(ready=True)
        await asyncio.sleep(MAX_LIFE_S)

    asyncio.run(serve())


def nats_sub(url: str, subject: str, limit_s: str) -> None:
    """Count one burst on ``subject`` (warm-up ``w``, data ``d``, end ``e``)."""

    async def serve() -> None:
        import nats

        nc = await nats.connect(url, pending_size=1 << 30)
        counter = _Counter()
        done = asyncio.Event()

        async def take(msg: Any) -> None:
            if counter.take(msg.data[:1]):
                done.set()

        await nc.subscribe(subject, cb=take, pending_msgs_limit=10_000_000)
        await nc.flush()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), float(limit_s))
        counter.report()
        await nc.close()

    asyncio.run(serve())


def redis_sub(path: str, channel: str, limit_s: str) -> None:
    """Count one burst on ``channel`` (warm-up ``w``, data ``d``, end ``e``)."""
    import redis

    client = redis.Redis(unix_socket_path=path)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    counter = _Counter()
    deadline = time.monotonic() + float(limit_s)
    try:
        while time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None and counter.take(bytes(msg["data"])[:1]):
                break
        counter.report()
    finally:
        pubsub.close()
        client.close()


class _Counter:
    """One burst as a subscriber sees it."""

    def __init__(self) -> None:
        self.received = 0
        self.first = self.last = 0.0
        self.ready = False

    def take(self, kind: bytes) -> bool:
        """Count one message; True at the end mark."""
        if kind == b"d":
            if not self.received:
                self.first = time.monotonic()
            self.received += 1
        elif kind == b"w" and not self.ready:
            self.ready = True
            say(ready=True)
        elif kind == b"e":
            self.last = time.monotonic()
            return True
        return False

    def report(self) -> None:
        say(received=self.received, first=self.first, last=self.last, ended=1)


CHILD_COMMANDS = {
    "nats-responder": nats_responder,
    "nats-sub": nats_sub,
    "redis-sub": redis_sub,
}
