"""The other end of each measurement, run as ``python -m bench.children CMD``.

Every command prints JSON lines on stdout: ``{"ready": true}`` once it serves,
then its figures. Each stops by itself after a bounded time, or on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import zmq

from bench.raw import marked

# No child outlives this, whatever its parent does.
MAX_LIFE_S = 600.0


def say(**fields: Any) -> None:
    """Print one JSON line for the parent."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _stop_on_term() -> None:
    def _raise(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, _raise)


def echo(url: str) -> None:
    """A ROUTER that sends every request straight back, draining per wake-up."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(url)
    say(ready=True)
    deadline = time.monotonic() + MAX_LIFE_S
    try:
        while time.monotonic() < deadline:
            if not sock.poll(1000):
                continue
            for _ in range(256):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                sock.send_multipart(frames)
    finally:
        sock.close(linger=0)
        ctx.term()


def relay(url: str, pub_url: str, topic: str) -> None:
    """A ROUTER that acknowledges every request and publishes it, doing no work.

    Each wake-up it drains what is ready, answers each request with a constant
    ``ok`` and publishes the request's bytes under ``topic`` (hex): the fact
    path of a broker with nothing to decode, check or store.
    """
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    pub = ctx.socket(zmq.PUB)
    for sock in (router, pub):
        sock.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 0)
    router.bind(url)
    pub.bind(pub_url)
    say(ready=True)
    ok, prefix = b'{"ok":true}', bytes.fromhex(topic)
    deadline = time.monotonic() + MAX_LIFE_S
    try:
        while time.monotonic() < deadline:
            if not router.poll(1000):
                continue
            batch = []
            for _ in range(256):
                try:
                    batch.append(router.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            for ident, _frame in batch:
                router.send_multipart([ident, ok])
            for _ident, frame in batch:
                pub.send_multipart([prefix, frame])
    finally:
        router.close(linger=0)
        pub.close(linger=0)
        ctx.term()


def proxy(front: str, back: str) -> None:
    """``zmq.proxy`` between an XSUB (publishers) and an XPUB (subscribers)."""
    ctx = zmq.Context()
    xsub = ctx.socket(zmq.XSUB)
    xpub = ctx.socket(zmq.XPUB)
    for sock in (xsub, xpub):
        sock.setsockopt(zmq.LINGER, 0)
    xsub.setsockopt(zmq.RCVHWM, 0)
    xpub.setsockopt(zmq.SNDHWM, 0)
    xsub.bind(front)
    xpub.bind(back)
    say(ready=True)
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(0))
    signal.alarm(int(MAX_LIFE_S))
    try:
        zmq.proxy(xsub, xpub)
    finally:
        xsub.close(linger=0)
        xpub.close(linger=0)
        ctx.term()


def zsub(url: str, topic: str, count: str, limit_s: str) -> None:
    """``count`` SUB sockets on ``url`` and ``topic`` (hex), counting one burst.

    Warm-up messages (``w``) make it say ready once every socket has one;
    data (``d``) are counted; an end mark (``e``) on every socket closes the
    burst, and it reports the count with the first and last arrival times.
    """
    ctx = zmq.Context()
    socks = []
    for _ in range(int(count)):
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.SUBSCRIBE, bytes.fromhex(topic))
        sock.connect(url)
        socks.append(sock)
    try:
        _count_burst(socks, marked, float(limit_s))
    finally:
        for sock in socks:
            sock.close(linger=0)
        ctx.term()


def _count_burst(
    socks: list[zmq.Socket[bytes]],
    mark: Callable[[list[bytes]], bytes],
    limit_s: float,
) -> None:
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    warm: set[int] = set()
    ended: set[int] = set()
    said_ready = False
    received = 0
    first = last = 0.0
    deadline = time.monotonic() + limit_s
    while len(ended) < len(socks) and time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            key = id(sock)
            for _ in range(4096):
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                for kind in [mark([frame]) for frame in frames[1:]]:
                    if kind == b"d":
                        if not received:
                            first = time.monotonic()
                        received += 1
                    elif kind == b"w":
                        warm.add(key)
                    elif kind == b"e":
                        ended.add(key)
                        last = time.monotonic()
        if not said_ready and len(warm) == len(socks):
            said_ready = True
            say(ready=True)
    say(received=received, first=first, last=last, ended=len(ended))


COMMANDS: dict[str, Callable[..., None]] = {
    "echo": echo,
    "proxy": proxy,
    "relay": relay,
    "zsub": zsub,
}


def main(argv: list[str]) -> None:
    """Run the command named by ``argv[0]`` with the rest as its arguments."""
    _stop_on_term()
    from fleetbus import log

    # Anything the library logs goes to stderr: stdout carries the figures.
    log.configure("warning", json=True, stream=sys.stderr)
    name, *args = argv
    if name in COMMANDS:
        COMMANDS[name](*args)
        return
    from bench import peers, sessions

    for module in (sessions, peers):
        command = getattr(module, "CHILD_COMMANDS", {}).get(name)
        if command is not None:
            command(*args)
            return
    raise SystemExit(f"unknown command {name!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
