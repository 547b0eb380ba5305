"""Learned facts end to end: real broker processes, real sessions, the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import queue
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from fleetbus.client import connect
from fleetbus.client.session import AsyncSession
from fleetbus.errors import BadInput, BadScope, LimitExceeded, NotOwner
from fleetbus.facts import FactEvent
from tests.support.brokerproc import BrokerProcess

WAIT_S = 10.0


@pytest.fixture
def repo(short_tmp: Path) -> Path:
    """A directory outside git: every session on it shares one repository."""
    path = short_tmp / "repo"
    path.mkdir()
    return path


@pytest.fixture
async def open_session(
    broker: BrokerProcess, repo: Path
) -> AsyncIterator[Callable[..., Any]]:
    """Connect sessions to the broker; every one is closed at teardown."""
    opened: list[AsyncSession] = []

    async def connect(name: str, **options: Any) -> AsyncSession:
        options.setdefault("session_id", f"sid-{name}")
        session = await AsyncSession.connect(
            broker.url, repo=repo, name=name, **options
        )
        opened.append(session)
        return session

    yield connect
    for session in opened:
        await session.close(leave=False)


class Collector:
    """Gathers a session's fact events and waits for the ones a test expects."""

    def __init__(self, session: AsyncSession) -> None:
        self.events: list[FactEvent] = []
        self._changed = asyncio.Event()
        session.on_fact(self._take)

    def _take(self, event: FactEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def until(self, check: Callable[[list[FactEvent]], bool]) -> None:
        async def wait() -> None:
            while not check(self.events):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(wait(), WAIT_S)

    def ids(self, kind: str = "published") -> list[str]:
        return [e.id for e in self.events if e.type == kind]


async def test_live_facts_reach_overlapping_subscribers_only(
    open_session: Callable[..., Any],
) -> None:
    """Dir, glob and file topics reach claims and subscriptions that overlap."""
    alice = await open_session("alice")
    bob = await open_session("bob")
    seen = Collector(alice)
    await alice.claim("src/auth/**")
    await alice.subscribe("docs/*.md")

    on_file = await bob.publish("src/auth/login.py", text="login is flaky")
    on_dir = await bob.publish("src/", text="src rule", kind="decision")
    on_glob = await bob.publish("docs/[a-m]*", text="docs rule")
    elsewhere = await bob.publish("tests/", "@build", text="unrelated")
    marker = await bob.publish("docs/z.md", text="last")
    await seen.until(lambda events: marker.id in [e.id for e in events])

    expected = [on_file.id, on_dir.id, on_glob.id, marker.id]
    assert sorted(seen.ids()) == sorted(expected)
    assert elsewhere.id not in seen.ids()


async def test_fact_events_iterates_from_the_call_and_ends_with_the_session(
    open_session: Callable[..., Any],
) -> None:
    """The async iterator yields the retained facts of what the session claims
    and then live ones, and stops when the session closes."""
    alice = await open_session("alice")
    bob = await open_session("bob")
    await alice.claim("src/")
    old = await bob.publish("src/a.py", text="before")
    stream = alice.fact_events()
    new = await bob.publish("src/b.py", text="after")

    first = await asyncio.wait_for(anext(stream), WAIT_S)
    second = await asyncio.wait_for(anext(stream), WAIT_S)
    await alice.close()
    rest = [event async for event in stream]

    assert [(first.id, first.type), (second.id, second.type)] == [
        (old.id, "published"),
        (new.id, "published"),
    ]
    assert rest == []


async def test_late_joiner_gets_exactly_the_overlapping_retained_facts(
    open_session: Callable[..., Any],
) -> None:
    """A session subscribing later gets the live facts that overlap, no others."""
    bob = await open_session("bob")
    wanted = [
        await bob.publish("src/auth/", text="one"),
        await bob.publish("src/*.py", text="two"),
        await bob.publish("@build", "src/auth/token.py", text="three"),
    ]
    await bob.publish("src/other/x.py", text="no")
    gone = await bob.publish("src/auth/old.py", text="gone")
    await bob.retract(gone.id)

    carol = await open_session("carol")
    retained = await carol.subscribe("src/auth/token.py")

    assert [f.id for f in retained] == [f.id for f in wanted[:1] + wanted[2:]]


async def test_no_fact_lost_between_snapshot_and_live_stream(
    open_session: Callable[..., Any],
) -> None:
    """Subscribing while another session publishes misses and repeats nothing."""
    bob = await open_session("bob")
    carol = await open_session("carol")
    seen = Collector(carol)
    published: list[str] = []
    halfway = asyncio.Event()

    async def publish_many() -> None:
        for n in range(200):
            fact = await bob.publish(f"src/m{n % 7}/f.py", text=f"fact {n}")
            published.append(fact.id)
            if n == 50:
                halfway.set()

    task = asyncio.create_task(publish_many())
    await halfway.wait()
    await carol.subscribe("src/")
    await task
    await seen.until(lambda events: len({e.id for e in events}) >= 200)

    assert sorted(seen.ids()) == sorted(published)
    assert len(seen.ids()) == len(set(seen.ids()))


async def test_a_dropped_live_event_is_recovered(
    open_session: Callable[..., Any],
) -> None:
    """An event lost on the way is noticed at the next one and fetched."""
    bob = await open_session("bob")
    carol = await open_session("carol")
    seen = Collector(carol)
    await carol.subscribe("src/a.py")
    take = carol._on_fact_event
    dropped: list[dict[str, Any]] = []

    def lossy(topic: bytes, event: dict[str, Any]) -> None:
        if not dropped and event.get("type") == "fact.published":
            dropped.append(event)
            return
        take(topic, event)

    carol._on_fact_event = lossy  # type: ignore[method-assign]
    first = await bob.publish("src/a.py", text="first, dropped")
    second = await bob.publish("src/a.py", text="second")
    await seen.until(lambda events: len(events) >= 2)

    assert dropped[0]["fact"]["id"] == first.id
    assert sorted(seen.ids()) == sorted([first.id, second.id])


async def test_a_lost_last_event_is_recovered_at_the_broker_heartbeat(
    open_session: Callable[..., Any],
) -> None:
    """An event lost with no later one on its topic is fetched once a broker
    heartbeat shows the repository moved on, and only what the followed scopes
    overlap is told; finished catch-ups are let go."""
    bob = await open_session("bob")
    carol = await open_session("carol")
    seen = Collector(carol)
    await carol.subscribe("src/a.py", "docs/")
    ready = await bob.publish("src/a.py", text="ready")
    await seen.until(lambda events: ready.id in [e.id for e in events])
    take = carol._on_fact_event

    def lossy(topic: bytes, event: dict[str, Any]) -> None:
        if event.get("type") != "fact.published":
            take(topic, event)

    carol._on_fact_event = lossy  # type: ignore[method-assign]
    elsewhere = await bob.publish("lib/", text="not followed, fetched all the same")
    last = await bob.publish("src/a.py", text="last on its topic, dropped")
    await seen.until(lambda events: last.id in [e.id for e in events])
    for n in range(3, 5):
        await bob.publish("docs/", text=f"dropped {n}")
        await seen.until(lambda events, told=n: len(seen.ids()) == told)

    assert seen.ids()[:2] == [ready.id, last.id]
    assert elsewhere.id not in [e.id for e in seen.events]
    assert len(carol._tasks) < 7


async def test_claims_changing_alone_cost_a_follower_no_fact_catch_up(
    broker_factory: Callable[..., BrokerProcess], repo: Path
) -> None:
    """A broker heartbeat names the seq of the repository's last fact event:
    a follower fetches what changed when that moves on, not when claims do."""
    broker = broker_factory("beats", extra_args=["--heartbeat-ms", "100"])
    bob = await AsyncSession.connect(broker.url, repo=repo, session_id="bob")
    carol = await AsyncSession.connect(broker.url, repo=repo, session_id="carol")
    try:
        seen = Collector(carol)
        await carol.subscribe("docs/")
        ready = await bob.publish("docs/a.md", text="ready")
        await seen.until(lambda events: ready.id in [e.id for e in events])
        catch_ups = 0
        send = carol._connection.transport.send

        def counting(message: dict[str, Any]) -> None:
            nonlocal catch_ups
            if message.get("op") == "facts" and "changed_since" in message:
                catch_ups += 1
            send(message)

        beats: asyncio.Queue[None] = asyncio.Queue()
        replica = carol._shared
        on_event = replica.on_event

        def counting_beats(event: dict[str, Any]) -> None:
            on_event(event)
            if event.get("type") == "heartbeat":
                beats.put_nowait(None)

        async def heartbeats(count: int) -> None:
            for _ in range(count):
                await asyncio.wait_for(beats.get(), WAIT_S)

        carol._connection.transport.send = counting  # type: ignore[method-assign]
        replica.on_event = counting_beats  # type: ignore[method-assign]
        await heartbeats(2)  # the catch-up for "ready" is done by the second
        catch_ups = 0
        for n in range(5):
            grant = await bob.claim(f"src/{n}.py")
            await bob.release(grant=grant.id)
        await heartbeats(3)
        after_claims = catch_ups
        await bob.publish("lib/x.py", text="on a topic carol does not follow")
        await heartbeats(3)
    finally:
        await bob.close(leave=False)
        await carol.close(leave=False)

    assert after_claims == 0
    assert catch_ups >= 1


async def test_shown_once_across_reconnects(
    open_session: Callable[..., Any],
) -> None:
    """unseen() returns a fact once per session id, across reconnects."""
    bob = await open_session("bob")
    fact = await bob.publish("src/auth/", text="token refresh races")
    own = await bob.unseen("src/")
    alice = await open_session("alice")
    await alice.claim("src/auth/login.py")

    peek = await alice.unseen(mark=False)
    first = await alice.unseen()
    second = await alice.unseen()
    await alice.close(leave=False)
    again = await open_session("alice")
    after_reconnect = await again.unseen("src/auth/login.py")
    later = await bob.publish("src/auth/x.py", text="another")
    marked = await again.mark_seen([later.id, "f999999"])

    assert own == []
    assert [f.id for f in peek] == [fact.id]
    assert [f.id for f in first] == [fact.id]
    assert second == []
    assert after_reconnect == []
    assert marked == [later.id]
    assert await again.unseen("src/") == []


async def test_unseen_covers_followed_scopes_as_well_as_claims(
    open_session: Callable[..., Any],
) -> None:
    """What is new for a session is one call over all the scopes it touches:
    those it claims and those it subscribed to."""
    bob = await open_session("bob")
    alice = await open_session("alice")
    await alice.claim("src/auth/")
    await alice.subscribe("docs/")
    on_claim = await bob.publish("src/auth/x.py", text="claimed")
    on_followed = await bob.publish("docs/api.md", text="followed")
    await bob.publish("lib/", text="neither")

    first = await alice.unseen()

    assert [f.id for f in first] == [on_claim.id, on_followed.id]
    assert await alice.unseen() == []


async def test_supersede_retract_and_expiry_are_events(
    open_session: Callable[..., Any],
) -> None:
    """Superseding, retracting and TTL expiry each reach subscribers."""
    alice = await open_session("alice")
    bob = await open_session("bob")
    seen = Collector(alice)
    await alice.subscribe("src/")

    # Each fact is seen before it ends: the end of a fact never shown is not
    # told, and a fact lost on the way is fetched only at the next heartbeat.
    old = await bob.publish("src/db.py", text="use sqlite", kind="decision")
    await seen.until(lambda events: old.id in seen.ids())
    new = await alice.supersede(old.id, "use postgres")
    doomed = await bob.publish("src/x.py", text="temporary")
    short = await bob.publish("src/y.py", text="short-lived", ttl=2.0)
    await seen.until(lambda events: {doomed.id, short.id} <= set(seen.ids()))
    with pytest.raises(NotOwner):
        await alice.retract(doomed.id)
    await bob.retract(doomed.id)
    await seen.until(
        lambda events: short.id in [e.id for e in events if e.type == "expired"]
    )

    kinds = [(e.type, e.id) for e in seen.events]
    assert ("superseded", old.id) in kinds
    assert ("retracted", doomed.id) in kinds
    assert ("expired", short.id) in kinds
    assert new.kind == "decision"
    assert new.supersedes == old.id
    live = [f.id for f in await bob.facts("src/")]
    history = [f.id for f in await bob.facts("src/", include_history=True)]
    assert live == [new.id]
    assert history == [old.id, new.id, doomed.id, short.id]


async def test_search_finds_words(open_session: Callable[..., Any]) -> None:
    """Search keeps facts whose text has every word given."""
    bob = await open_session("bob")
    hit = await bob.publish("src/", text="The authentication cache is stale")
    await bob.publish("src/", text="The cache of templates")

    assert [f.id for f in await bob.facts(search="auth cache")] == [hit.id]
    assert await bob.facts(search="nothing-like-this") == []


async def test_facts_survive_a_broker_kill(
    broker: BrokerProcess, open_session: Callable[..., Any]
) -> None:
    """Acknowledged facts, their ends and seen marks survive SIGKILL."""
    bob = await open_session("bob")
    alice = await open_session("alice")
    kept = await bob.publish("src/a.py", text="kept", kind="gotcha")
    gone = await bob.publish("src/b.py", text="gone")
    await bob.retract(gone.id)
    await alice.unseen("src/")

    broker.restart()
    again = await open_session("alice2", session_id="sid-alice")

    assert [f.id for f in await again.facts("src/")] == [kept.id]
    assert await again.unseen("src/") == []
    newer = await again.publish("src/c.py", text="after restart")
    assert newer.seq > kept.seq


async def test_oversized_and_malformed_facts_are_refused(
    broker: BrokerProcess, open_session: Callable[..., Any]
) -> None:
    """Bad facts are refused with a clear error and the broker keeps serving."""
    bob = await open_session("bob")

    with pytest.raises(LimitExceeded) as info:
        await bob.publish("src/", text="x" * 4097)
    assert info.value.details["limit"] == "fact_bytes"
    with pytest.raises(BadInput):
        await bob.publish("src/", text="x", kind="rumour")
    with pytest.raises(BadInput):
        await bob.publish(text="no topic")
    for ttl in (0, -1, math.inf, math.nan):
        with pytest.raises(BadInput):
            await bob.publish("src/", text="x", ttl=ttl)
    with pytest.raises(BadScope):
        await bob.publish("../outside", text="x")
    with pytest.raises(BadInput):
        await bob._request("publish", topics="src/", body="x")
    with pytest.raises(BadInput):
        await bob._request("facts", repo=bob.repo.id, limit=0)

    assert (await bob.publish("src/", text="fine")).body == "fine"
    assert broker.proc is not None
    assert broker.proc.poll() is None


async def test_retention_drops_oldest_with_events(
    broker_factory: Callable[..., BrokerProcess], repo: Path
) -> None:
    """Past the count bound the oldest facts are dropped, each with an event."""
    small = broker_factory("small", env={"FLEETBUS_FACTS_MAX": "3"})
    bob = await AsyncSession.connect(small.url, repo=repo, name="bob")
    alice = await AsyncSession.connect(small.url, repo=repo, name="alice")
    try:
        seen = Collector(alice)
        await alice.subscribe("src/")
        facts = []
        for n in range(5):
            # Seen before dropped: the drop of a fact never shown is not told.
            facts.append(await bob.publish("src/a.py", text=f"n{n}"))
            await seen.until(lambda events, n=n: len(seen.ids()) == n + 1)
        await seen.until(lambda events: len(seen.ids("dropped")) >= 2)

        assert seen.ids("dropped") == [facts[0].id, facts[1].id]
        history = await bob.facts(include_history=True)
        assert [f.id for f in history] == [f.id for f in facts[2:]]
    finally:
        await bob.close()
        await alice.close()


async def test_retention_by_age_drops_old_facts_with_events(
    broker_factory: Callable[..., BrokerProcess], repo: Path
) -> None:
    """Past the age bound the broker drops a fact on its own, with an event."""
    brief = broker_factory("brief", env={"FLEETBUS_FACTS_MAX_AGE_S": "1"})
    bob = await AsyncSession.connect(brief.url, repo=repo, name="bob")
    alice = await AsyncSession.connect(brief.url, repo=repo, name="alice")
    try:
        seen = Collector(alice)
        await alice.subscribe("src/")
        # Once one fact has come, the subscription is in place at the PUB
        # and the next is seen well before it ages out.
        ready = await bob.publish("src/ready.py", text="ready")
        await seen.until(lambda events: ready.id in seen.ids())
        fact = await bob.publish("src/a.py", text="short-lived by retention")
        await seen.until(lambda events: fact.id in seen.ids("dropped"))

        assert await bob.facts(include_history=True) == []
    finally:
        await bob.close()
        await alice.close()


async def test_broker_warns_when_a_session_holding_claims_is_lost(
    open_session: Callable[..., Any],
) -> None:
    """A lost session's claims become a warning fact naming its worktree."""
    watcher = await open_session("watcher")
    seen = Collector(watcher)
    await watcher.subscribe("src/")
    doomed = await open_session(
        "doomed", meta={"worktree": "/work/tree-7", "branch": "feature-x"}
    )
    await doomed.claim("src/auth/", "src/db.py", intent="refactor")

    await doomed.close(leave=False)
    await seen.until(
        lambda events: any(e.fact and e.fact.sid == "fleetbus" for e in events)
    )

    warning = next(e.fact for e in seen.events if e.fact and e.fact.sid == "fleetbus")
    assert warning.kind == "warning"
    assert {t.text for t in warning.topics} == {"src/auth/", "src/db.py"}
    assert "sid-doomed" in warning.body
    assert "/work/tree-7" in warning.body
    assert "feature-x" in warning.body
    assert "uncommitted" in warning.body


def test_blocking_session_fact_methods(broker: BrokerProcess, repo: Path) -> None:
    """The blocking facade publishes, supersedes, retracts, queries, follows
    (callback and iterator) and keeps shown-once records like the async one."""
    told: queue.Queue[FactEvent] = queue.Queue()
    with (
        connect(broker.url, repo=repo, name="alice", session_id="sync-a") as alice,
        connect(broker.url, repo=repo, name="bob", session_id="sync-b") as bob,
    ):
        first = bob.publish("src/auth/", text="tokens expire early", kind="gotcha")
        assert [f.id for f in alice.subscribe("src/auth/login.py")] == [first.id]
        alice.on_fact(told.put)
        events = alice.fact_events()
        newer = bob.supersede(first.id, "tokens expire after 60s")
        other = bob.publish("src/auth/*.py", text="retract me", ttl=60)
        # Read before retracting: a subscription still on its way to the
        # broker's PUB misses live events, and the catch-up that fetches them
        # would find a fact it never showed already gone.
        streamed = [next(events) for _ in range(3)]
        called = [told.get(timeout=WAIT_S) for _ in range(3)]
        bob.retract(other.id)
        assert [(e.type, e.id) for e in streamed] == [
            ("published", newer.id),
            ("superseded", first.id),
            ("published", other.id),
        ]
        assert called == streamed
        assert [f.id for f in alice.facts("src/", kind="gotcha")] == [newer.id]
        assert [f.id for f in alice.facts(author="bob", include_history=True)] == [
            first.id,
            newer.id,
            other.id,
        ]
        assert [f.id for f in alice.unseen("src/", mark=False)] == [newer.id]
        assert alice.mark_seen([newer.id]) == [newer.id]
        assert alice.unseen("src/") == []
        with pytest.raises(NotOwner):
            alice.retract(newer.id)


# --- the command line ----------------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``fleetbus`` in this process; its exit code, stdout and stderr."""
    from fleetbus import cli

    out, err = io.BytesIO(), io.StringIO()
    wrapper = io.TextIOWrapper(out, encoding="utf-8", write_through=True)
    with contextlib.redirect_stdout(wrapper), contextlib.redirect_stderr(err):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
    wrapper.flush()
    return code, out.getvalue().decode(), err.getvalue()


async def test_cli_fact_facts_retract_and_exit_codes(
    broker: BrokerProcess, repo: Path
) -> None:
    """The fact commands publish, list and retract, with the claim commands'
    exit codes; oversized or malformed facts exit with 2."""
    common = ["--url", broker.url, "--repo", str(repo), "--session", "cli-t"]

    def cli(*argv: str) -> tuple[int, str, str]:
        return run_cli(argv[0], *common, *argv[1:])

    code, out, _ = await asyncio.to_thread(
        cli, "fact", "src/auth/", "tokens expire early", "--kind", "gotcha", "--json"
    )
    assert code == 0
    fact = orjson.loads(out)["fact"]
    assert fact["kind"] == "gotcha"

    code, out, _ = await asyncio.to_thread(
        cli, "facts", "src/auth/login.py", "--since", "1h", "--json"
    )
    assert code == 0
    assert [f["id"] for f in orjson.loads(out)["facts"]] == [fact["id"]]

    code, out, _ = await asyncio.to_thread(cli, "facts", "--search", "tokens")
    assert code == 0
    assert fact["id"] in out

    code, _, err = await asyncio.to_thread(cli, "fact", "src/", "x" * 5000)
    assert code == 2
    assert "4096" in err
    code, _, _ = await asyncio.to_thread(cli, "fact", "../x", "text")
    assert code == 2
    code, _, _ = await asyncio.to_thread(cli, "facts", "--since", "yesterday-ish")
    assert code == 2

    code, _, _ = await asyncio.to_thread(
        run_cli, "retract", *common[:4], "--session", "someone-else", fact["id"]
    )
    assert code == 1
    code, out, _ = await asyncio.to_thread(cli, "retract", fact["id"], "--json")
    assert code == 0
    assert orjson.loads(out)["fact"]["state"] == "retracted"

    code, _, _ = await asyncio.to_thread(
        run_cli, "facts", "--url", "ipc:///nonexistent/fb.sock", "--timeout", "0.3"
    )
    assert code == 3


async def test_cli_facts_says_when_more_match_than_the_limit(
    broker: BrokerProcess, repo: Path
) -> None:
    """Past ``--limit`` the listing keeps the newest (the first since a seq)
    and says that more matched: ``more`` in JSON, a line on stderr."""
    common = ["--url", broker.url, "--repo", str(repo), "--session", "cli-t"]

    def cli(*argv: str) -> tuple[int, str, str]:
        return run_cli(argv[0], *common, *argv[1:])

    ids = []
    for n in range(3):
        _, out, _ = await asyncio.to_thread(cli, "fact", "src/", f"n{n}", "--json")
        ids.append(orjson.loads(out)["fact"]["id"])

    _, out, _ = await asyncio.to_thread(cli, "facts", "--limit", "2", "--json")
    newest = orjson.loads(out)
    _, out, _ = await asyncio.to_thread(
        cli, "facts", "--limit", "2", "--since", "0", "--json"
    )
    first = orjson.loads(out)
    _, out, err = await asyncio.to_thread(cli, "facts", "--limit", "2")
    _, _, quiet = await asyncio.to_thread(cli, "facts", "--limit", "3")
    bad, _, _ = await asyncio.to_thread(cli, "facts", "--limit", "0")

    assert [f["id"] for f in newest["facts"]] == ids[1:]
    assert newest["more"] is True
    assert [f["id"] for f in first["facts"]] == ids[:2]
    assert first["more"] is True
    assert ids[0] not in out
    assert "more than 2 facts match" in err
    assert quiet == ""
    assert bad == 2
