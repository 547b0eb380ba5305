"""The session SDK against a real broker process."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog

from fleetbus.client import AsyncSession, connect
from fleetbus.errors import BadInput, BrokerUnavailable, Conflict, Deadlock, TimedOut
from fleetbus.repo import RepoInfo
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
        session = await AsyncSession.connect(
            broker.url, repo=repo, name=name, session_id=name, **options
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


async def test_racing_sessions_exactly_one_wins(join: Callable[..., Any]) -> None:
    """Five sessions claim overlapping scopes at once; one grant, four conflicts."""
    sessions = [await join(f"s{i}") for i in range(5)]
    scopes = ["src/", "src/a.py", "src/*.py", "src/a.py", "**"]

    results = await asyncio.gather(
        *(s.claim(scope) for s, scope in zip(sessions, scopes, strict=True)),
        return_exceptions=True,
    )

    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 4


async def test_shared_claims_coexist_exclusive_is_refused(
    join: Callable[..., Any],
) -> None:
    """Shared claims live side by side; an exclusive one names the holders."""
    a, b, c = await join("a"), await join("b"), await join("c")

    await a.claim("src/", shared=True)
    await b.claim("src/a.py", shared=True)
    with pytest.raises(Conflict) as refused:
        await c.claim("src/a.py", intent="edit")

    assert {h["sid"] for h in refused.value.details["holders"]} == {"a", "b"}


async def test_waits_are_granted_in_order(join: Callable[..., Any]) -> None:
    """Queued claims are granted first come, first served when released."""
    holder = await join("holder")
    first, second = await join("first"), await join("second")
    grant = await holder.claim("src/a.py")
    watch = holder.events()

    won: list[str] = []

    async def wait_for(session: AsyncSession) -> None:
        got = await session.claim("src/a.py", wait=DEADLINE_S)
        won.append(session.sid)
        await session.release(grant=got.id)

    one = asyncio.create_task(wait_for(first))
    await next_event(watch, lambda e: e["type"] == "wait.queued")
    two = asyncio.create_task(wait_for(second))
    await next_event(watch, lambda e: e["type"] == "wait.queued")
    await holder.release(grant=grant.id)
    await asyncio.wait_for(asyncio.gather(one, two), DEADLINE_S)

    assert won == ["first", "second"]


async def test_wait_runs_out(join: Callable[..., Any]) -> None:
    """A wait that is not granted in time raises TimedOut."""
    a, b = await join("a"), await join("b")
    await a.claim("@db")

    with pytest.raises(TimedOut):
        await b.claim("@db", wait=0.2)


async def test_cancelled_wait_is_withdrawn(join: Callable[..., Any]) -> None:
    """A claim cancelled while queued leaves the queue; the next waiter gets it."""
    holder, quitter, patient = await join("holder"), await join("q"), await join("p")
    grant = await holder.claim("@db")
    watch = holder.events()
    quitting = asyncio.create_task(quitter.claim("@db", wait=DEADLINE_S))
    await next_event(watch, lambda e: e["type"] == "wait.queued")
    waiting = asyncio.create_task(patient.claim("@db", wait=DEADLINE_S))
    await next_event(watch, lambda e: e["type"] == "wait.queued")

    quitting.cancel()
    ended = await next_event(watch, lambda e: e["type"] == "wait.ended")
    await holder.release(grant=grant.id)
    got = await asyncio.wait_for(waiting, DEADLINE_S)
    await holder.wait_synced(got.fence)

    assert (ended["sid"], ended["reason"]) == ("q", "cancelled")
    assert quitting.cancelled()
    assert [row.grant for row in holder.holders("@db")] == [got.id]


async def test_claim_cancelled_as_its_grant_arrives_gives_it_back(
    join: Callable[..., Any],
) -> None:
    """A cancel landing between the grant's reply and claim()'s return is kept.

    The grant is released at the broker and the caller sees the cancellation,
    not a grant it no longer waits for.
    """
    a = await join("a")
    on_reply = a._connection.on_reply

    def cancel_on_grant(reply: dict[str, Any]) -> None:
        on_reply(reply)
        if "grant" in reply:
            claiming.cancel()

    a._connection.transport.on_replies(cancel_on_grant)
    claiming = asyncio.create_task(a.claim("src/", ttl=600))
    await asyncio.wait({claiming}, timeout=DEADLINE_S)

    assert claiming.cancelled()
    assert (await a.snapshot())["claims"] == []


async def test_deadlock_is_refused(join: Callable[..., Any]) -> None:
    """A wait that would close a cycle is refused, not left to hang."""
    a, b = await join("a"), await join("b")
    await a.claim("@x")
    await b.claim("@y")
    watch = b.events()
    waiting = asyncio.create_task(a.claim("@y", wait=DEADLINE_S))
    await next_event(watch, lambda e: e["type"] == "wait.queued")

    with pytest.raises(Deadlock):
        await b.claim("@x", wait=DEADLINE_S)
    waiting.cancel()


async def test_retry_with_the_same_rid_grants_once(join: Callable[..., Any]) -> None:
    """Sending one claim request twice under one rid yields one grant."""
    a = await join("a")
    message = {
        "op": "claim",
        "rid": "same-rid",
        "sid": a.sid,
        "scopes": ["src/a.py"],
        "mode": "exclusive",
        "intent": "",
    }

    first = await a._exchange(dict(message), None, None)
    again = await a._exchange(dict(message), None, None)
    await a.wait_synced()

    assert first["grant"] == again["grant"]
    assert len(a.claims(mine=True)) == 1


async def test_retried_release_releases_once(join: Callable[..., Any]) -> None:
    """A release retried under its rid does not take a claim granted since."""
    a = await join("a")
    await a.claim("src/a.py")
    message = {"op": "release", "rid": "rel", "sid": a.sid, "scopes": ["src/a.py"]}

    first = await a._exchange(dict(message), None, None)
    later = await a.claim("src/a.py")
    again = await a._exchange(dict(message), None, None)
    await a.wait_synced()

    assert again["released"] == first["released"] != []
    assert [row.grant for row in a.claims(mine=True)] == [later.id]


async def test_retry_after_a_broker_restart_grants_once(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """The first reply survives a SIGKILL: a retry gets it, not a second grant."""
    a = await join("a")
    message = {"op": "claim", "rid": "keep", "sid": a.sid, "scopes": ["@db"]}
    first = await a._exchange(dict(message), None, None)
    stream = a.events()

    broker.restart()
    await next_event(stream, lambda e: e["type"] == "resync")
    again = await a._exchange(dict(message), None, None)
    await a.wait_synced()

    assert (again["grant"], again["fence"]) == (first["grant"], first["fence"])
    assert [row.grant for row in a.claims(mine=True)] == [first["grant"]]


async def test_replica_answers_like_the_broker(join: Callable[..., Any]) -> None:
    """After wait_synced, local holders and may_edit match the broker's table."""
    a, b, c = await join("a"), await join("b"), await join("c")
    await a.claim("src/", intent="refactor")
    await b.claim("docs/*.md", "@db")
    await b.release("@db")
    await c.wait_synced()

    snapshot = await c.snapshot()
    assert sorted(r["id"] for r in snapshot["claims"]) == sorted(
        r.id for r in c.claims()
    )
    assert [r.sid for r in c.holders("src/x/y.py")] == ["a"]
    assert [r.sid for r in c.holders(str(c.repo.root / "docs" / "a.md"))] == ["b"]
    assert c.holders("@db") == []
    assert a.may_edit("src/a.py")
    assert not c.may_edit("src/a.py")
    assert c.may_edit("README.md")


async def test_claiming_releases_on_exit(join: Callable[..., Any]) -> None:
    """The context manager releases its grant when the block ends."""
    a, b = await join("a"), await join("b")

    async with a.claiming("src/a.py") as grant:
        assert grant.fence > 0
        assert a.may_edit("src/a.py")
    await b.wait_synced()

    assert b.may_edit("src/a.py")


CHILD = textwrap.dedent(
    """
    import sys
    from fleetbus import log
    from fleetbus.client import connect
    from fleetbus.repo import RepoInfo

    url, root = sys.argv[1], sys.argv[2]
    log.configure("warning")
    repo = RepoInfo(id="path:" + root, root=__import__("pathlib").Path(root),
                    branch=None)
    session = connect(url, repo=repo, session_id="child", name="child")
    session.claim("src/a.py", intent="child work")
    print("claimed", flush=True)
    sys.stdin.read()
    """
)


async def test_killed_process_loses_its_claims(
    join: Callable[..., Any], broker: BrokerProcess, repo: RepoInfo
) -> None:
    """A SIGKILLed session's claim is released within lease plus grace."""
    watcher = await join("watcher")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, broker.url, str(repo.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = await asyncio.to_thread(child.stdout.readline)
        assert line.strip() == b"claimed"
        await watcher.wait_synced()
        assert not watcher.may_edit("src/a.py")
        stream = watcher.events()
        child.kill()

        event = await next_event(
            stream,
            lambda e: e["type"] == "claim.released" and e["sid"] == "child",
        )
    finally:
        child.kill()
        child.wait()

    assert event["reason"] == "session_lost"
    assert watcher.may_edit("src/a.py")


async def test_idle_session_keeps_its_claims(
    broker_factory: Callable[..., BrokerProcess], repo: RepoInfo
) -> None:
    """With a 600 ms lease, an idle live session holds on for five leases."""
    broker = broker_factory("short", lease_ms=600)
    idle = await AsyncSession.connect(broker.url, repo=repo, session_id="idle")
    other = await AsyncSession.connect(broker.url, repo=repo, session_id="other")
    try:
        await idle.claim("src/a.py")
        await other.wait_synced()
        stream = other.events()

        # The idle session must not be lost for five lease periods: the
        # timeout is the assertion, not a pause.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                next_event(
                    stream,
                    lambda e: (
                        e.get("sid") == "idle"
                        and e["type"] in ("session.lost", "claim.released")
                    ),
                ),
                3.0,
            )

        with pytest.raises(Conflict):
            await other.claim("src/a.py")
        assert not other.may_edit("src/a.py")
    finally:
        await idle.close()
        await other.close()


async def test_broker_restart_keeps_claims_and_resyncs(
    join: Callable[..., Any], broker: BrokerProcess
) -> None:
    """A SIGKILLed broker comes back with every granted claim; clients resync."""
    a, b = await join("a"), await join("b")
    grant = await a.claim("src/a.py", intent="before crash")
    old_epoch = a.epoch
    stream = b.events()

    broker.restart()
    await next_event(stream, lambda e: e["type"] == "resync")
    await a.wait_synced()

    assert b.epoch > old_epoch
    assert [r.grant for r in b.holders("src/a.py")] == [grant.id]
    with pytest.raises(Conflict):
        await b.claim("src/a.py")
    later = await b.claim("src/b.py")
    assert later.fence > grant.fence


async def test_idle_replica_recovers_a_missed_event_from_the_heartbeat(
    join: Callable[..., Any],
) -> None:
    """An event lost on the way is noticed by the broker's heartbeat alone."""
    a, idle = await join("a"), await join("idle")
    events = idle._transport.events
    lossy_in_use = asyncio.Event()

    async def lossy() -> list[tuple[bytes, dict[str, Any]]]:
        lossy_in_use.set()
        batch = await events()
        return [item for item in batch if item[1].get("type") != "claim.granted"]

    idle._transport.events = lossy
    await asyncio.wait_for(lossy_in_use.wait(), DEADLINE_S)
    stream = idle.events()
    await a.claim("src/a.py")

    await next_event(stream, lambda e: e["type"] == "resync")

    assert [r.sid for r in idle.holders("src/a.py")] == ["a"]
    assert not idle.may_edit("src/a.py")


async def test_closed_session_ends_its_own_loops(join: Callable[..., Any]) -> None:
    """Heartbeat and repair loops stop once closed, even if a cancel was lost."""
    a = await join("a")
    await a.close()
    a._want_repair()

    await asyncio.wait_for(a._heartbeat(), DEADLINE_S)
    await asyncio.wait_for(a._repair_loop(), DEADLINE_S)


async def test_close_sends_no_heartbeat_after_leave(
    join: Callable[..., Any],
) -> None:
    """A beat due while the session leaves is not sent, and close warns of nothing."""
    a = await join("a")
    request = a._request
    sent: list[str] = []
    beat_due = asyncio.Event()
    leaving = asyncio.Event()

    async def watched(op: str, **fields: Any) -> dict[str, Any]:
        if op == "heartbeat":
            beat_due.set()
            await leaving.wait()
        if op == "leave":
            leaving.set()
        sent.append(op)
        return await request(op, **fields)

    a._request = watched  # type: ignore[method-assign]
    a.heartbeat_ms = 0
    await asyncio.wait_for(beat_due.wait(), DEADLINE_S)
    with structlog.testing.capture_logs() as logged:
        await a.close()

    assert "heartbeat" not in sent[sent.index("leave") :]
    assert [e for e in logged if e["log_level"] != "debug"] == []


async def test_force_release_frees_another_sessions_claims(
    join: Callable[..., Any],
) -> None:
    """The local user, an operator by default, force-releases by scope and by id."""
    holder = await join("holder")
    operator = await join("operator")
    first = await holder.claim("src/a.py", ttl=600)
    second = await holder.claim("src/b.py", ttl=600)

    by_scope = await operator.force_release("src/a.py")
    by_id = await operator.force_release(ids=[second.claims[0].id])

    assert by_scope == [first.claims[0].id]
    assert by_id == [second.claims[0].id]
    assert (await operator.snapshot())["claims"] == []
    with pytest.raises(BadInput):
        await operator.force_release()


async def test_unreachable_broker_raises(tmp_path: Path, repo: RepoInfo) -> None:
    """No broker at the URL: BrokerUnavailable after the timeout."""
    with pytest.raises(BrokerUnavailable):
        await AsyncSession.connect(
            f"ipc://{tmp_path}/none.sock", repo=repo, timeout=0.3
        )


def test_blocking_claim_interrupted_after_its_grant_gives_it_back(
    broker: BrokerProcess, repo: RepoInfo
) -> None:
    """Ctrl-C as the grant reaches the calling thread releases that grant."""
    with connect(broker.url, repo=repo, session_id="sync") as session:
        run = session._runner.run

        def interrupted(coro: Any) -> Any:
            run(coro)
            raise KeyboardInterrupt

        session._runner.run = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            session.claim("src/", ttl=600)
        session._runner.run = run  # type: ignore[method-assign]

        assert session.snapshot()["claims"] == []


def test_blocking_session(broker: BrokerProcess, repo: RepoInfo) -> None:
    """The sync facade claims, reads the replica and closes its thread."""
    with connect(broker.url, repo=repo, session_id="sync") as session:
        with session.claiming("src/", intent="sync") as grant:
            assert session.may_edit(str(repo.root / "src" / "x.py"))
            assert [c.grant for c in session.claims(mine=True)] == [grant.id]
        session.wait_synced()
        assert session.claims() == []
