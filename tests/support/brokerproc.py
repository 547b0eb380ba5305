"""A real broker process for tests: started, killed and restarted on demand."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import zmq

READY_TIMEOUT_S = 20.0


def ping(url: str, timeout_s: float = 0.2) -> dict[str, Any] | None:
    """One ping to the broker at ``url``; its reply, or None if none came."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(url)
        sock.send(orjson.dumps({"op": "ping", "rid": "ping"}))
        if sock.poll(int(timeout_s * 1000)):
            reply: dict[str, Any] = orjson.loads(sock.recv())
            return reply
        return None
    finally:
        sock.close(linger=0)


class BrokerProcess:
    """A ``python -m fleetbus.broker`` child on an ipc socket in ``workdir``.

    ``url`` binds another address instead, such as ``tcp://127.0.0.1:0``: with
    port 0, :attr:`url` becomes the address bound, as the broker logs it.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        url: str | None = None,
        lease_ms: int = 1000,
        grace_ms: int | None = None,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.bind_url = url or f"ipc://{workdir}/broker.sock"
        self.url = self.bind_url
        self.data_dir = workdir / "data"
        self.log_path = workdir / "broker.log"
        self.lease_ms = lease_ms
        self.args = ["--lease-ms", str(lease_ms), "--log-json", "--log-level", "debug"]
        if grace_ms is not None:
            self.args += ["--grace-ms", str(grace_ms)]
        self.args += extra_args or []
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.epoch = 0

    def start(self, env: dict[str, str] | None = None) -> BrokerProcess:
        """Start the process and wait until it answers a ping."""
        assert self.proc is None or self.proc.poll() is not None
        full_env = {**os.environ, **self.env, **(env or {})}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "fleetbus.broker",
                    "--url",
                    self.bind_url,
                    "--data",
                    str(self.data_dir),
                    *self.args,
                ],
                stdout=log,
                stderr=log,
                env=full_env,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited early:\n{self.log()}")
            url = self._bound_url()
            if url is None:
                time.sleep(0.05)
                continue
            reply = ping(url)
            if reply is not None:
                self.url = url
                self.epoch = reply["epoch"]
                return self
        self.kill()
        raise RuntimeError(f"broker did not answer in time:\n{self.log()}")

    def _bound_url(self) -> str | None:
        """The URL to reach; for port 0, the last one the broker said it bound."""
        if not self.bind_url.endswith(":0"):
            return self.bind_url
        bound = None
        for line in self.log().splitlines():
            if '"broker.started"' in line:
                bound = str(orjson.loads(line)["url"])
        return bound

    def log(self) -> str:
        """What the broker logged so far."""
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the broker and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.wait()

    def stop(self) -> int:
        """SIGTERM the broker and wait for a clean exit; returns its exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def wait(self, timeout: float = 20.0) -> int:
        """Reap the process."""
        if self.proc is None:
            return 0
        return self.proc.wait(timeout)

    def restart(self, env: dict[str, str] | None = None) -> BrokerProcess:
        """SIGKILL, then start again on the same socket and data."""
        self.kill()
        return self.start(env)
