"""A control-channel proxy that can cut the line: a partition on demand.

Clients connect their DEALER to the proxy's ROUTER; for each client the proxy
opens its own DEALER to the broker, so the broker still sees one peer per
client. While partitioned, everything is dropped both ways, as a network that
loses packets would; healing forwards again. Events (the broker's PUB) do not
pass through the proxy.
"""

from __future__ import annotations

import threading
from typing import Any

import zmq


class PartitionProxy(threading.Thread):
    """Forwards requests and replies between clients and a broker."""

    def __init__(self, front_url: str, broker_url: str) -> None:
        super().__init__(daemon=True)
        self.front_url = front_url
        self.broker_url = broker_url
        self.partitioned = threading.Event()
        self.dropped = 0
        self._halt = threading.Event()
        self._bound = threading.Event()

    def start(self) -> None:
        """Start forwarding once the front socket is bound."""
        super().start()
        assert self._bound.wait(10), "proxy did not bind"

    def run(self) -> None:
        """Forward until stopped, one backend DEALER per client."""
        ctx = zmq.Context()
        front = ctx.socket(zmq.ROUTER)
        front.setsockopt(zmq.LINGER, 0)
        front.bind(self.front_url)
        self._bound.set()
        backs: dict[bytes, zmq.Socket[Any]] = {}
        owners: dict[zmq.Socket[Any], bytes] = {}
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        try:
            while not self._halt.is_set():
                for sock, _ in poller.poll(50):
                    if sock is front:
                        ident, body = front.recv_multipart()
                        back = backs.get(ident)
                        if back is None:
                            back = ctx.socket(zmq.DEALER)
                            back.setsockopt(zmq.LINGER, 0)
                            back.connect(self.broker_url)
                            backs[ident] = back
                            owners[back] = ident
                            poller.register(back, zmq.POLLIN)
                        if self.partitioned.is_set():
                            self.dropped += 1
                        else:
                            back.send(body)
                    else:
                        body = sock.recv()
                        if self.partitioned.is_set():
                            self.dropped += 1
                        else:
                            front.send_multipart([owners[sock], body])
        finally:
            for back in backs.values():
                back.close(linger=0)
            front.close(linger=0)
            ctx.term()

    def cut(self) -> None:
        """Start dropping everything."""
        self.partitioned.set()

    def heal(self) -> None:
        """Forward again."""
        self.partitioned.clear()

    def stop(self) -> None:
        """Stop the thread and close its sockets."""
        self._halt.set()
        self.join(10)
