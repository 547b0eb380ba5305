"""Sessions of one process share a connection and a replica, and stay apart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq

from fleetbus import wire
from fleetbus.client import AsyncSession, connect
from fleetbus.client.connection import open_connections
from fleetbus.errors import BadInput, Conflict, LimitExceeded
from fleetbus.repo import RepoInfo
from fleetbus.security import CLIENT_KEY_ENV
from tests.support.brokerproc import BrokerProcess

DEADLINE_S = 15.0


@pytest.fixture
def repo(tmp_path: Path) -> RepoInfo:
    root = tmp_path / "work"
    (root / "src").mkdir(parents=True)
    return RepoInfo(id=f"path:{root}", root=root, branch=None)


@pytest.fixture
async def join(
    broker: BrokerProcess, repo: RepoInfo
) -> AsyncIterator[Callable[..., Any]]:
    sessions: list[AsyncSession] = []

    async def start(name: str, **options: Any) -> AsyncSession:
        options.setdefault("repo", repo)
        session = await AsyncSession.connect(
            broker.url, name=name, session_id=name, **options
        )
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        await session.close(leave=False)


async def next_event(
    stream: AsyncIterator[dict[str, Any]], accept: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    async def find() -> dict[str, Any]:
        async for event in stream:
            if accept(event):
                return event
        raise AssertionError("the event stream ended")

    return await asyncio.wait_for(find(), DEADLINE_S)


def count_sent(session: AsyncSession, op: str) -> list[int]:
    """Count the requests of kind ``op`` sent on the session's connection."""
    transport = session._connection.transport
    send = transport.send
    sent = [0]

    def counting(message: dict[str, Any]) -> None:
        if message.get("op") == op:
            sent[0] += 1
        send(message)

    transport.send = counting  # type: ignore[method-assign]
    return sent


async def test_sessions_share_one_connection_and_one_replica(
    join: Callable[..., Any],
) -> None:
    """Five sessions of one repository: one set of sockets, one replica."""
    sessions = [await join(f"s{i}") for i in range(5)]
    first = sessions[0]

    assert open_connections() == [first._connection]
    assert all(s._connection is first._connection for s in sessions)
    assert all(s._transport is first._transport for s in sessions)
    assert all(s._shared is first._shared for s in sessions)
    assert list(first._connection.replicas.values()) == [first._shared]


async def test_each_event_is_applied_once_for_all_sessions(
    join: Callable[..., Any],
) -> None:
    """Claims and releases of several sessions reach the one view once each."""
    sessions = [await join(f"s{i}") for i in range(4)]
    view = sessions[0]._shared.view
    apply = view.apply
    applied: list[str] = []

    def counting(event: dict[str, Any]) -> None:
        applied.append(event["type"])
        apply(event)

    view.apply = counting  # type: ignore[method-assign]
    for n, session in enumerate(sessions):
        grant = await session.claim(f"src/f{n}.py")
        await session.release(grant=grant.id)
    await sessions[-1].wait_synced()

    assert applied.count("claim.granted") == 4
    assert applied.count("claim.released") == 4


async def test_repositories_get_a_replica_each_on_one_connection(
    join: Callable[..., Any], tmp_path: Path
) -> None:
    """Sessions of two repositories share the sockets, not the claims."""
    other_root = tmp_path / "other"
    other_root.mkdir()
    other = RepoInfo(id=f"path:{other_root}", root=other_root, branch=None)
    a = await join("a")
    b = await join("b", repo=other)
    await a.claim("src/a.py")
    await b.wait_synced()

    assert a._connection is b._connection
    assert a._shared is not b._shared
    assert b.holders("src/a.py") == []
    assert [row.sid for row in a.holders("src/a.py")] == ["a"]


async def test_each_session_reads_its_own_grants_before_their_events(
    join: Callable[..., Any],
) -> None:
    """With the event stream held back, each session sees its own claims only."""
    sessions = [await join(f"s{i}") for i in range(3)]
    transport = sessions[0]._transport
    events = transport.events
    held = asyncio.Event()

    async def hold() -> list[tuple[bytes, dict[str, Any]]]:
        held.set()
        await asyncio.Event().wait()
        return await events()

    transport.events = hold  # type: ignore[method-assign]
    await asyncio.wait_for(held.wait(), DEADLINE_S)

    grants = [await s.claim(f"src/f{n}.py") for n, s in enumerate(sessions)]

    for n, (session, grant) in enumerate(zip(sessions, grants, strict=True)):
        assert [row.grant for row in session.claims(mine=True)] == [grant.id]
        assert [row.grant for row in session.holders(f"src/f{n}.py")] == [grant.id]
        others = [s for s in sessions if s is not session]
        assert all(o.holders(f"src/f{n}.py") == [] for o in others)
    await sessions[0].release(grant=grants[0].id)
    assert sessions[0].claims(mine=True) == []
    assert [row.grant for row in sessions[1].claims(mine=True)] == [grants[1].id]


async def test_a_gap_is_repaired_once_for_every_session(
    join: Callable[..., Any],
) -> None:
    """A lost event makes one snapshot, and every session hears of the resync."""
    a, b, c = await join("a"), await join("b"), await join("c")
    streams = [s.events() for s in (a, b, c)]
    transport = a._transport
    events = transport.events
    lossy_in_use = asyncio.Event()

    async def lossy() -> list[tuple[bytes, dict[str, Any]]]:
        lossy_in_use.set()
        batch = await events()
        return [item for item in batch if item[1].get("type") != "claim.granted"]

    transport.events = lossy  # type: ignore[method-assign]
    await asyncio.wait_for(lossy_in_use.wait(), DEADLINE_S)
    snapshots = count_sent(a, "snapshot")
    await a.claim("src/a.py")

    for stream in streams:
        await next_event(stream, lambda e: e["type"] == "resync")

    assert snapshots[0] == 1
    for session in (a, b, c):
        assert [row.sid for row in session.holders("src/a.py")] == ["a"]
    assert not b.may_edit("src/a.py")


async def test_a_broker_restart_repairs_every_session(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """After a restart all sessions join again, resync, and claim as before."""
    sessions = [await join(f"s{i}") for i in range(3)]
    grant = await sessions[0].claim("src/a.py")
    old_epoch = sessions[0].epoch
    streams = [s.events() for s in sessions]

    broker.restart()
    for stream in streams:
        await next_event(stream, lambda e: e["type"] == "resync")

    assert all(s.epoch > old_epoch for s in sessions)
    for session in sessions:
        assert [row.grant for row in session.holders("src/a.py")] == [grant.id]
    with pytest.raises(Conflict):
        await sessions[1].claim("src/a.py")
    later = await sessions[2].claim("src/c.py")
    await sessions[1].wait_synced()
    assert [row.grant for row in sessions[1].holders("src/c.py")] == [later.id]


async def test_closing_one_session_leaves_the_others_working(
    join: Callable[..., Any],
) -> None:
    """One session leaves; the rest keep claiming and their replica stays fed."""
    a, b, c = await join("a"), await join("b"), await join("c")
    connection = a._connection
    await a.claim("src/a.py")

    await a.close()
    grant = await b.claim("src/a.py")
    await c.wait_synced()

    assert [row.grant for row in c.holders("src/a.py")] == [grant.id]
    assert not connection.closed
    assert a not in connection.sessions
    assert a not in b._shared.sessions

    await b.close()
    await c.close()
    assert connection.closed
    assert open_connections() == []


async def test_a_session_after_the_last_closed_opens_a_new_connection(
    join: Callable[..., Any],
) -> None:
    """Once every session closed, the next one gets fresh sockets."""
    a = await join("a")
    old = a._connection
    await a.close()

    b = await join("b")
    await b.claim("src/b.py")

    assert b._connection is not old
    assert [row.sid for row in b.claims()] == ["b"]


async def test_different_credentials_do_not_share(
    join: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Sessions that would present other client keys get their own connection."""
    a = await join("a")
    monkeypatch.setenv(CLIENT_KEY_ENV, str(tmp_path / "other.key_secret"))
    b = await join("b")

    assert a._connection is not b._connection
    assert len(open_connections()) == 2


def test_blocking_sessions_share_a_loop_thread_and_a_connection(
    broker: BrokerProcess, repo: RepoInfo
) -> None:
    """Blocking sessions share one loop thread; the last to close ends it."""
    first = connect(broker.url, repo=repo, session_id="one")
    second = connect(broker.url, repo=repo, session_id="two")
    runner = first._runner
    try:
        assert second._runner is runner
        assert first.core._connection is second.core._connection
        grant = first.claim("src/a.py", ttl=600)
        first.close()
        with pytest.raises(Conflict):
            second.claim("src/a.py")
        second.wait_synced()
        assert [row.grant for row in second.holders("src/a.py")] == [grant.id]
    finally:
        first.close()
        second.close()

    assert runner.loop.is_closed()


def other_repo(tmp_path: Path) -> RepoInfo:
    root = tmp_path / "other"
    root.mkdir(exist_ok=True)
    return RepoInfo(id=f"path:{root}", root=root, branch=None)


async def test_sessions_joining_together_take_one_snapshot(
    join: Callable[..., Any], tmp_path: Path
) -> None:
    """Five sessions of a repository connecting at once load one snapshot."""
    keeper = await join("keeper")
    snapshots = count_sent(keeper, "snapshot")
    repo = other_repo(tmp_path)

    sessions = await asyncio.gather(*(join(f"s{n}", repo=repo) for n in range(5)))
    streams = [s.events() for s in sessions]
    await sessions[0].claim("src/a.py")
    await sessions[4].wait_synced()

    assert snapshots[0] == 1
    assert all(s.sid in sessions[4].sessions for s in sessions)
    for stream in streams:
        first = await next_event(stream, lambda e: True)
        assert first["type"] == "claim.granted"


async def test_a_replica_goes_with_its_last_session_and_comes_back_fed(
    join: Callable[..., Any], tmp_path: Path
) -> None:
    """With the connection kept by another repository, a replica starts over."""
    await join("keeper", repo=other_repo(tmp_path))
    gone = await join("gone")
    connection = gone._connection
    await gone.close()

    assert gone._shared not in connection.replicas.values()
    a, b = await join("a"), await join("b")
    grant = await a.claim("src/a.py")
    await b.wait_synced()

    assert a._connection is connection
    assert a._shared is not gone._shared
    assert [row.grant for row in b.holders("src/a.py")] == [grant.id]


async def restart_refusing(
    broker: BrokerProcess, refused: AsyncSession, kept: AsyncSession
) -> None:
    """Restart the broker with ``refused``'s joins failing; return once
    ``kept``'s replica has resynced."""
    stream = kept.events()

    async def refuse() -> None:
        raise BadInput("not taken back")

    refused._join = refuse  # type: ignore[method-assign]
    broker.restart()
    await next_event(stream, lambda e: e["type"] == "resync")


async def test_a_session_refused_on_rejoin_does_not_hold_the_others_back(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """After a restart, one session the broker will not take back leaves the
    replica's repair to go on for the rest."""
    refused, kept = await join("refused"), await join("kept")
    await restart_refusing(broker, refused, kept)
    grant = await kept.claim("src/a.py")
    await kept.wait_synced()

    assert kept.epoch > refused.epoch
    assert [row.grant for row in kept.holders("src/a.py")] == [grant.id]


def test_a_connection_left_by_an_ended_loop_is_closed_by_the_next(
    broker: BrokerProcess, repo: RepoInfo
) -> None:
    """A session never closed leaves its connection behind; a later loop gets a
    fresh one and the old sockets are closed."""

    async def left_open() -> Any:
        session = await AsyncSession.connect(broker.url, repo=repo, session_id="left")
        return session._connection

    async def later() -> Any:
        session = await AsyncSession.connect(broker.url, repo=repo, session_id="new")
        try:
            await session.claim("src/a.py")
            return session._connection
        finally:
            await session.close()

    old = asyncio.run(left_open())
    new = asyncio.run(later())

    assert new is not old
    assert old.closed


async def test_a_replica_loads_the_compact_snapshot(
    join: Callable[..., Any], broker: BrokerProcess, tmp_path: Path
) -> None:
    """A joining replica asks for claim groups and holds the same rows."""
    other = other_repo(tmp_path)
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(broker.url)

    def ask(rid: str, **fields: Any) -> None:
        raw.send(orjson.dumps({"rid": rid, **fields}))
        assert raw.poll(int(DEADLINE_S * 1000)), "the broker did not answer"
        assert orjson.loads(raw.recv())["ok"] is True

    try:
        ask("h", op="hello", repo=other.id, sid="holder")
        # TTLs: the raw session sends no heartbeats, its claims outlive it.
        ask(
            "c1",
            op="claim",
            sid="holder",
            scopes=["src/a.py", "src/b.py"],
            ttl_ms=600_000,
        )
        ask(
            "c2",
            op="claim",
            sid="holder",
            scopes=["docs/**"],
            mode="shared",
            intent="writing",
            ttl_ms=600_000,
        )
    finally:
        raw.close(linger=0)
    keeper = await join("keeper")
    transport = keeper._connection.transport
    send = transport.send
    asked: list[dict[str, Any]] = []

    def recording(message: dict[str, Any]) -> None:
        if message.get("op") == "snapshot":
            asked.append(message)
        send(message)

    transport.send = recording  # type: ignore[method-assign]
    reader = await join("reader", repo=other)

    assert [message.get("compact") for message in asked] == [True]
    rows = sorted((c.scope.text, c.mode, c.intent, c.sid) for c in reader.claims())
    assert rows == [
        ("docs/", "shared", "writing", "holder"),
        ("src/a.py", "exclusive", "", "holder"),
        ("src/b.py", "exclusive", "", "holder"),
    ]
    assert not reader.may_edit("src/a.py")
    assert reader.may_edit("src/c.py")


async def test_a_lost_join_event_costs_a_snapshot_not_a_broker_heartbeat(
    broker_factory: Callable[..., BrokerProcess], repo: RepoInfo
) -> None:
    """A join whose event never arrives is ready after one more snapshot."""
    broker = broker_factory(extra_args=["--heartbeat-ms", "60000"])
    a = await AsyncSession.connect(broker.url, session_id="a", repo=repo)
    b: AsyncSession | None = None
    try:
        replica = a._shared
        on_event = replica.on_event

        def lossy(event: dict[str, Any]) -> None:
            if event.get("session", {}).get("sid") != "b":
                on_event(event)

        replica.on_event = lossy  # type: ignore[method-assign]
        snapshots = count_sent(a, "snapshot")

        b = await AsyncSession.connect(
            broker.url, session_id="b", repo=repo, timeout=DEADLINE_S
        )

        assert snapshots[0] == 1
        assert b.applied >= b._join_head  # type: ignore[operator]
        assert sorted(a.sessions) == ["a", "b"]
        assert b._generation == 1
    finally:
        for session in (b, a):
            if session is not None:
                await session.close(leave=False)


async def test_a_session_keeps_its_lease_while_its_replica_loads(
    join: Callable[..., Any], broker: BrokerProcess, tmp_path: Path
) -> None:
    """Heartbeats start at the join, not once the first snapshot is in."""
    keeper = await join("keeper")
    connection = keeper._connection
    exchange = connection.exchange
    transport = connection.transport
    send = transport.send
    beats = 0
    beating = asyncio.Event()
    slow_repo = other_repo(tmp_path)

    def counting(message: dict[str, Any]) -> None:
        nonlocal beats
        if message.get("op") == "heartbeat" and message.get("sid") == "slow":
            beats += 1
            if beats * broker.lease_ms / 3 > 1.5 * broker.lease_ms:
                beating.set()
        send(message)

    async def held(message: dict[str, Any], *args: Any) -> dict[str, Any]:
        if message.get("op") == "snapshot" and message.get("repo") == slow_repo.id:
            await asyncio.wait_for(beating.wait(), DEADLINE_S)
        return await exchange(message, *args)

    transport.send = counting  # type: ignore[method-assign]
    connection.exchange = held  # type: ignore[method-assign]

    slow = await join("slow", repo=slow_repo, timeout=DEADLINE_S)
    await slow.claim("src/a.py")

    assert beating.is_set()
    assert slow._generation == 1
    assert '"sid":"slow","reason":"lease_expired"' not in broker.log()


async def test_waiting_for_the_head_past_a_lost_last_event_loads_a_snapshot(
    broker_factory: Callable[..., BrokerProcess], repo: RepoInfo
) -> None:
    """A lost last event is found by a wait for the head, not a broker heartbeat."""
    broker = broker_factory(extra_args=["--heartbeat-ms", "60000"])
    a = await AsyncSession.connect(broker.url, session_id="a", repo=repo)
    b = await AsyncSession.connect(broker.url, session_id="b", repo=repo, replica=False)
    try:
        replica = a._shared
        on_event = replica.on_event

        def lossy(event: dict[str, Any]) -> None:
            if event.get("type") != "claim.granted":
                on_event(event)

        replica.on_event = lossy  # type: ignore[method-assign]
        grant = await b.claim("src/b.py")

        await a.wait_synced(timeout=DEADLINE_S)

        assert [row.grant for row in a.holders("src/b.py")] == [grant.id]
    finally:
        for session in (b, a):
            await session.close(leave=False)


async def test_an_oversized_request_is_refused_here_and_the_connection_stays(
    join: Callable[..., Any],
) -> None:
    """A request past the broker's message limit is refused before it is sent:
    the broker would drop the process's shared connection, and the other
    sessions' requests with it."""
    big = await join("big")
    other = await join("other")
    connection = big._connection

    with pytest.raises(LimitExceeded) as info:
        await big.claim(*(f"src/f{n:06d}/" + "x" * 200 + ".py" for n in range(25_000)))

    assert info.value.details["limit"] == "message_bytes"
    assert other._connection is connection
    assert not connection.pending
    grant = await asyncio.wait_for(other.claim("src/other.py"), DEADLINE_S)
    assert grant.claims[0].scope.text == "src/other.py"
    assert (await asyncio.wait_for(big.claim("src/big.py"), DEADLINE_S)).claims


async def test_subscriptions_go_with_the_sessions_that_made_them(
    join: Callable[..., Any], tmp_path: Path
) -> None:
    """A repository's claims stream and a session's fact scopes stay subscribed
    while some session on the connection needs them, and no longer."""
    other_root = tmp_path / "other"
    (other_root / "src").mkdir(parents=True)
    other = RepoInfo(id=f"path:{other_root}", root=other_root, branch=None)
    keeper = await join("keeper")
    transport = keeper._connection.transport
    before = transport.topics

    a = await join("a", repo=other)
    b = await join("b", repo=other)
    await a.subscribe("src/a.py")
    await b.subscribe("src/a.py", "src/b/")
    claims_topic = wire.claims_topic(other.id)
    added = {t: n for t, n in transport.topics.items() if t not in before}
    assert added[claims_topic] == 3  # a, b and their shared replica
    facts_topics = [t for t in added if t != claims_topic]
    assert facts_topics
    assert all(t.startswith(wire.FACTS_KIND) for t in facts_topics)

    await a.close()
    assert transport.topics[claims_topic] == 2
    assert set(transport.topics) == set(before) | set(added)
    await b.close()

    assert transport.topics == before
    again = await join("again", repo=other)
    writer = await join("writer", repo=other, replica=False)
    await again.subscribe("src/")
    events = again.fact_events()
    published = await writer.publish("src/a.py", text="back")
    event = await asyncio.wait_for(anext(events), DEADLINE_S)
    grant = await writer.claim("src/c.py")
    await again.wait_synced()

    assert event.id == published.id
    assert [row.grant for row in again.holders("src/c.py")] == [grant.id]


async def test_a_session_refused_on_rejoin_costs_no_snapshot_per_heartbeat(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """A session the broker will not take back tries again on its own
    heartbeats; the replica it shares takes no snapshot per heartbeat for it,
    only one once the session is back."""
    refused, kept = await join("refused"), await join("kept")
    await restart_refusing(broker, refused, kept)
    replica = kept._shared
    snapshots = 0
    take_snapshot = replica._snapshot

    async def counting(sessions: list[AsyncSession]) -> dict[str, Any]:
        nonlocal snapshots
        snapshots += 1
        return await take_snapshot(sessions)

    heartbeats = 0
    beaten = asyncio.Event()
    on_event = replica.on_event

    def counting_beats(event: dict[str, Any]) -> None:
        nonlocal heartbeats
        on_event(event)
        if event.get("type") == "heartbeat":
            heartbeats += 1
            if heartbeats == 3:
                beaten.set()

    replica._snapshot = counting  # type: ignore[method-assign]
    replica.on_event = counting_beats  # type: ignore[method-assign]
    await asyncio.wait_for(beaten.wait(), DEADLINE_S)
    grant = await kept.claim("src/a.py")
    await kept.wait_synced()

    assert snapshots == 0
    assert not replica.syncing
    assert [row.grant for row in kept.holders("src/a.py")] == [grant.id]

    # Taken back at last: one snapshot, and the session is current again.
    back = refused.events()
    del refused._join
    await next_event(back, lambda e: e["type"] == "resync")

    assert refused.epoch == kept.epoch
    assert snapshots == 1
    assert refused.holders("src/a.py") == kept.holders("src/a.py")


async def test_heartbeats_during_a_repair_ask_for_no_second_snapshot(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """Broker heartbeats of a new epoch that arrive while the repair is loading
    its snapshot are left to that repair: one restart costs one snapshot."""
    kept = await join("kept")
    await kept.wait_synced()
    replica, old_epoch = kept._shared, kept.epoch
    snapshots = 0
    heartbeats = 0
    beats = {2: asyncio.Event(), 5: asyncio.Event()}
    take_snapshot = replica._snapshot
    on_event = replica.on_event

    async def held(sessions: list[AsyncSession]) -> dict[str, Any]:
        nonlocal snapshots
        snapshots += 1
        if snapshots == 1:
            # Two heartbeats of the new epoch reach the replica mid-repair.
            await asyncio.wait_for(beats[2].wait(), DEADLINE_S)
        return await take_snapshot(sessions)

    def counting_beats(event: dict[str, Any]) -> None:
        nonlocal heartbeats
        on_event(event)
        if event.get("type") == "heartbeat" and event.get("epoch") != old_epoch:
            heartbeats += 1
            if heartbeats in beats:
                beats[heartbeats].set()

    replica._snapshot = held  # type: ignore[method-assign]
    replica.on_event = counting_beats  # type: ignore[method-assign]
    stream = kept.events()
    broker.restart()
    await next_event(stream, lambda e: e["type"] == "resync")
    await asyncio.wait_for(beats[5].wait(), DEADLINE_S)
    grant = await kept.claim("src/a.py")
    await kept.wait_synced()

    assert snapshots == 1
    assert not replica.syncing
    assert [row.grant for row in kept.holders("src/a.py")] == [grant.id]


async def test_a_session_lost_and_refused_says_so_once(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """The broker forgot a session and will not take it back: the session's
    heartbeats keep asking, and its listeners hear ``session.lost`` once."""
    lost = await join("lost")
    notices: list[dict[str, Any]] = []
    lost.on_event(notices.append)
    beats = asyncio.Event()
    tries = 0

    async def refuse() -> None:
        nonlocal tries
        tries += 1
        if tries == 3:
            beats.set()
        raise BadInput("not taken back")

    lost._join = refuse  # type: ignore[method-assign]
    ctx = zmq.Context.instance()
    other = ctx.socket(zmq.DEALER)
    other.setsockopt(zmq.LINGER, 0)
    other.connect(broker.url)
    try:
        other.send(orjson.dumps({"op": "leave", "rid": "forget", "sid": "lost"}))
        assert other.poll(int(DEADLINE_S * 1000))
        assert orjson.loads(other.recv())["ok"]
        await asyncio.wait_for(beats.wait(), DEADLINE_S)
    finally:
        other.close(linger=0)

    assert [e for e in notices if e["type"] == "session.lost"] == [
        {"type": "session.lost", "sid": "lost", "reason": "unknown"}
    ]
