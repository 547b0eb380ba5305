"""A broker process speaking CURVE on loopback, and keys for its peers."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from fleetbus.security import create_keys, load_public, load_secret

PEERS = ("alice", "bob", "mallory", "op")


@dataclass
class Keys:
    """Key pairs by name, the allow-list and operator directories."""

    dir: Path
    allow: Path
    operators: Path

    def public(self, name: str) -> Path:
        """The public key file of ``name``."""
        return self.dir / f"{name}.key"

    def secret(self, name: str) -> Path:
        """The secret key file of ``name``."""
        return self.dir / f"{name}.key_secret"


class CurvePeer:
    """A DEALER with a CURVE key pair that pins the broker's key."""

    def __init__(self, url: str, keys: Keys, name: str | None) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if name is not None:
            public, secret = load_secret(keys.secret(name))
            self.sock.curve_serverkey = load_public(keys.public("broker"))
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(url)
        self.count = 0

    def request(
        self, op: str, timeout: float = 3.0, **fields: Any
    ) -> dict[str, Any] | None:
        """One request; its reply, or None when none came (refused at handshake)."""
        self.count += 1
        rid = f"{op}-{self.count}"
        try:
            self.sock.send(orjson.dumps({"op": op, "rid": rid, **fields}), zmq.NOBLOCK)
        except zmq.Again:
            return None
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0, int((deadline - time.monotonic()) * 1000))):
            reply: dict[str, Any] = orjson.loads(self.sock.recv())
            if reply.get("rid") == rid:
                return reply
        return None

    def close(self) -> None:
        """Close the socket."""
        self.sock.close(linger=0)


def free_port() -> int:
    """A loopback port the OS reports free."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class CurveBroker:
    """A broker process with CURVE on, allow-list and operator directories."""

    def __init__(self, workdir: Path, keys: Keys, *extra: str) -> None:
        self.workdir = workdir
        self.keys = keys
        self.url = f"tcp://127.0.0.1:{free_port()}"
        self.log_path = workdir / "broker.log"
        args = [
            sys.executable, "-m", "fleetbus.broker",
            "--url", self.url,
            "--data", str(workdir / "data"),
            "--curve-secret", str(keys.secret("broker")),
            "--curve-allow", str(keys.allow),
            "--curve-operators", str(keys.operators),
            "--heartbeat-ms", "100",
            "--log-json", "--log-level", "debug",
            *extra,
        ]  # fmt: skip
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=log)
        peer = CurvePeer(self.url, keys, "alice")
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.log_path.read_text())
                if peer.request("ping", timeout=0.2) is not None:
                    return
            raise RuntimeError(f"broker did not answer:\n{self.log()}")
        finally:
            peer.close()

    def peer(self, name: str | None) -> CurvePeer:
        """A peer with the key pair ``name`` (None: no CURVE)."""
        return CurvePeer(self.url, self.keys, name)

    def log(self) -> str:
        """What the broker logged so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the broker and reap it."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def keys() -> Iterator[Keys]:
    """Key pairs for the broker and four peers; alice, bob and op admitted."""
    path = Path(tempfile.mkdtemp(prefix="fb-keys-"))
    keys = Keys(path / "keys", path / "allow", path / "operators")
    for name in ("broker", *PEERS):
        create_keys(keys.dir, name)
    keys.allow.mkdir()
    keys.operators.mkdir()
    for name in ("alice", "bob", "op"):
        shutil.copy(keys.public(name), keys.allow)
    shutil.copy(keys.public("op"), keys.operators)
    yield keys
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def curve_broker(keys: Keys, short_tmp: Path) -> Iterator[CurveBroker]:
    """A CURVE broker on a loopback port; killed at teardown."""
    broker = CurveBroker(short_tmp, keys)
    yield broker
    broker.kill()
    for stray in keys.allow.glob("mallory*"):
        os.unlink(stray)
