"""Processes, placement and a broker for the scenarios.

Every child process is started here and stopped by the :class:`Children`
that started it, so a failed scenario leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson
import zmq

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Placement:
    """Where the server side and the client side of a measurement run.

    ``split`` puts them on two vCPUs, ``same`` on one; ``free`` pins nothing.
    """

    name: str
    server: set[int] | None
    client: set[int] | None


def cpus() -> list[int]:
    """The CPUs this process may run on."""
    return sorted(os.sched_getaffinity(0))


def placements() -> list[Placement]:
    """The placements this machine offers, the two-vCPU one first."""
    mine = cpus()
    if len(mine) < 2:
        return [Placement("same", {mine[0]}, {mine[0]})]
    return [
        Placement("split", {mine[0]}, {mine[1]}),
        Placement("same", {mine[0]}, {mine[0]}),
    ]


@contextlib.contextmanager
def pinned(cpuset: set[int] | None) -> Iterator[None]:
    """Run this process on ``cpuset`` for the block (all CPUs if None)."""
    before = os.sched_getaffinity(0)
    if cpuset is not None:
        os.sched_setaffinity(0, cpuset)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_pid(pid: int, cpuset: set[int] | None) -> None:
    """Move process ``pid`` (every thread of it) onto ``cpuset``."""
    target = cpuset if cpuset is not None else set(cpus())
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(int(task), target)


def child_env() -> dict[str, str]:
    """The environment of child processes: this repo's ``src`` and ``bench``."""
    env = dict(os.environ)
    paths = [str(ROOT / "src"), str(ROOT)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


class Child:
    """One child process whose stdout carries JSON lines."""

    def __init__(self, args: list[str], *, cpuset: set[int] | None = None) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=child_env(),
            cwd=ROOT,
        )
        if cpuset is not None:
            pin_pid(self.proc.pid, cpuset)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def read(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """The next JSON line the child prints."""
        stdout = self.proc.stdout
        assert stdout is not None
        line = _readline(stdout, timeout)
        if not line:
            raise RuntimeError(f"{self.args[2:4]} exited: {self.stderr_tail()}")
        value: dict[str, Any] = json.loads(line)
        return value

    def stderr_tail(self) -> str:
        """What the child wrote on stderr, once it has exited."""
        if self.proc.poll() is None or self.proc.stderr is None:
            return "(still running)"
        return self.proc.stderr.read().decode(errors="replace")[-2000:]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def _readline(stream: IO[bytes], timeout: float) -> bytes:
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise TimeoutError("the child printed nothing in time")
    return stream.readline()


def bench_child(command: str, *args: str, cpuset: set[int] | None = None) -> Child:
    """Start ``python -m bench.children COMMAND ARGS``."""
    return Child([PYTHON, "-m", "bench.children", command, *args], cpuset=cpuset)


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def ping(url: str, timeout_s: float = 0.2) -> dict[str, Any] | None:
    """One ping to the broker at ``url``; its reply, or None."""
    return ask(url, "ping", timeout_s)


def ask(url: str, op: str, timeout_s: float = 0.2) -> dict[str, Any] | None:
    """One request ``op`` without a session to the broker at ``url``; its
    reply, or None."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(url)
        sock.send(orjson.dumps({"op": op, "rid": op}))
        if sock.poll(int(timeout_s * 1000)):
            reply: dict[str, Any] = orjson.loads(sock.recv())
            return reply
        return None
    finally:
        sock.close(linger=0)


class Broker:
    """A ``python -m fleetbus.broker`` child on an ipc socket, logging warnings.

    Logging stays at ``warning`` so that the figures measure the broker, not
    its debug log.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        lease_ms: int = 600_000,
        cpuset: set[int] | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.url = f"ipc://{workdir}/broker.sock"
        self.data_dir = workdir / "data"
        self.lease_ms = lease_ms
        self.cpuset = cpuset
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_in_s = 0.0

    def start(self) -> Broker:
        """Start the process; return once it answers a ping."""
        log = open(self.workdir / "broker.log", "ab")  # noqa: SIM115
        began = time.perf_counter()
        with log:
            self.proc = subprocess.Popen(
                [
                    PYTHON,
                    "-m",
                    "fleetbus.broker",
                    "--url",
                    self.url,
                    "--data",
                    str(self.data_dir),
                    "--lease-ms",
                    str(self.lease_ms),
                    "--log-level",
                    "warning",
                    "--log-json",
                    *self.extra_args,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=child_env(),
                cwd=ROOT,
            )
        if self.cpuset is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(self.proc.pid, self.cpuset)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"broker exited early:\n{self.log()}")
            if ping(self.url, 0.05) is not None:
                self.started_in_s = time.perf_counter() - began
                if self.cpuset is not None:
                    pin_pid(self.proc.pid, self.cpuset)
                return self
        raise RuntimeError(f"broker did not answer in time:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        """What the broker logged so far."""
        path = self.workdir / "broker.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM and reap; SIGKILL if it does not finish in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_timed(args: list[str], *, stdin: bytes = b"") -> float:
    """Run a process to its exit; the wall time from start to exit in ms."""
    began = time.perf_counter()
    subprocess.run(
        args,
        input=stdin,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=child_env(),
        cwd=ROOT,
        check=False,
    )
    return (time.perf_counter() - began) * 1000


def versions() -> dict[str, Any]:
    """The environment of the run."""
    import platform

    return {
        "cpu_count": os.cpu_count(),
        "cpus_allowed": cpus(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pyzmq": zmq.pyzmq_version(),
        "libzmq": zmq.zmq_version(),
        "orjson": orjson.__version__,
        "platform": platform.platform(),
        "executable": PYTHON,
    }
