"""Event messages carry one or more events of one topic, one frame each."""

from __future__ import annotations

import time
from typing import Any

import orjson
import zmq

from fleetbus.broker.server import _by_topic
from fleetbus.client.transport import _drain


def test_consecutive_events_on_one_topic_share_a_message_in_order() -> None:
    events: list[tuple[bytes, dict[str, Any]]] = [
        (b"c1", {"seq": 1}),
        (b"c1", {"seq": 2}),
        (b"f1", {"seq": 3}),
        (b"c1", {"seq": 4}),
    ]

    messages = _by_topic(events)

    assert [m[0] for m in messages] == [b"c1", b"f1", b"c1"]
    bodies = [[orjson.loads(frame)["seq"] for frame in m[1:]] for m in messages]
    assert bodies == [[1, 2], [3], [4]]


def test_a_subscriber_gets_every_event_of_a_message_with_its_topic() -> None:
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    sub = ctx.socket(zmq.SUB)
    try:
        pub.bind("inproc://event-frames")
        sub.connect("inproc://event-frames")
        sub.setsockopt(zmq.SUBSCRIBE, b"c")
        got: list[tuple[bytes, dict[str, Any]]] = []
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            pub.send_multipart([b"c1", b'{"seq":1}', b'{"seq":2}'])
            if sub.poll(50):
                got = _drain(sub, topic=True)

        assert got[:2] == [(b"c1", {"seq": 1}), (b"c1", {"seq": 2})]
    finally:
        pub.close(linger=0)
        sub.close(linger=0)
