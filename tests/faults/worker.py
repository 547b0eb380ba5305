"""A session process for fault runs: random operations, recorded as a history.

Run as ``python -m tests.faults.worker DIR SID SEED``. It joins the broker at
``$FLEETBUS_URL`` for the repository ``fault-repo``, performs random claims,
waits, releases, renewals, publications, retractions and queries for
``--ops`` operations or ``--seconds``, recording each in ``DIR/SID.jsonl``,
then writes ``DIR/SID.done``. Once ``DIR/quiet`` exists it dumps its replica
to ``DIR/SID.replica.json`` whenever the replica has caught up with the
broker, and it leaves when ``DIR/exit`` exists.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from fleetbus.client import AsyncSession
from fleetbus.errors import BrokerUnavailable, FleetbusError, TimedOut
from fleetbus.repo import RepoInfo
from tests.faults.history import Recorder

REPO = "fault-repo"
SCOPES = (
    "src/a.py",
    "src/b.py",
    "src/",
    "src/*.py",
    "src/sub/c.py",
    "docs/x.md",
    "docs/**",
    "@db",
)
TOPICS = ("src/a.py", "src/", "docs/x.md", "@build", "src/sub/")
POLL_S = 0.05


def repo_info(root: Path) -> RepoInfo:
    """The repository every fault-run session works on."""
    return RepoInfo(id=REPO, root=root, branch=None)


class Worker:
    """One session doing random operations and recording them."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.dir: Path = args.dir
        self.sid: str = args.sid
        self.rng = random.Random(args.seed)
        self.ops: int = args.ops
        self.seconds: float = args.seconds
        self.lease: bool = not args.no_lease
        self.stall_after: int = args.stall_after
        self.stall_s: float = args.stall_s
        self.hold: str | None = args.hold
        self.rec = Recorder(self.dir / f"{self.sid}.jsonl", self.sid)
        self.grants: list[str] = []
        self.held: str | None = None
        self.facts: list[str] = []
        self.session: AsyncSession | None = None

    async def run(self) -> None:
        """Join, do the operations, then settle until told to exit."""
        index = self.rec.invoke("hello")
        self.session = await AsyncSession.connect(
            args_url(),
            repo=repo_info(self.dir),
            session_id=self.sid,
            name=self.sid,
            leased=self.lease,
            timeout=2.0,
        )
        self.rec.ok(index, epoch=self.session.epoch)
        self.session.on_event(self.on_event)
        if self.hold is not None:
            await self.claim([self.hold], wait=10.0)
        deadline = time.monotonic() + self.seconds
        done = 0
        while done < self.ops and time.monotonic() < deadline:
            if done == self.stall_after:
                self.rec.note("stall", seconds=self.stall_s)
                # Blocks the event loop on purpose: no reads, no heartbeats.
                time.sleep(self.stall_s)
            await self.step()
            done += 1
        (self.dir / f"{self.sid}.done").write_text(str(done))
        await self.settle()

    def on_event(self, event: dict[str, Any]) -> None:
        """Note the session's own notices: a resync, a lost session."""
        if event.get("type") in ("resync", "session.lost"):
            self.rec.note(str(event["type"]))

    async def step(self) -> None:
        """One random operation."""
        roll = self.rng.random()
        if roll < 0.35 or not self.grants:
            await self.claim()
        elif roll < 0.55 and self.releasable():
            await self.release()
        elif roll < 0.62 and self.releasable() and self.hold is None:
            await self.renew()
        elif roll < 0.82:
            await self.publish()
        elif roll < 0.88 and self.facts:
            await self.retract()
        else:
            await self.query()

    async def claim(
        self, scopes: list[str] | None = None, wait: float | None = None
    ) -> None:
        """Claim random scopes (or ``scopes``), sometimes waiting or with a TTL."""
        assert self.session is not None
        count = 1 if self.rng.random() < 0.8 else 2
        scopes = scopes or self.rng.sample(SCOPES, count)
        shared = self.rng.random() < 0.2 and self.hold not in scopes
        if wait is None and self.rng.random() < 0.3:
            wait = 0.1
        # A holder's claims must all end with its lease, so none has a TTL.
        ttl = 30.0 if self.rng.random() < 0.1 and self.hold is None else None
        index = self.rec.invoke(
            "claim", scopes=scopes, shared=shared, wait=wait, ttl=ttl
        )
        try:
            grant = await self.session.claim(
                *scopes, shared=shared, wait=wait, ttl=ttl, intent=self.sid
            )
        except Exception as exc:
            self.completed_badly(index, exc)
            return
        self.grants.append(grant.id)
        if self.hold is not None and scopes == [self.hold]:
            self.held = grant.id
        self.rec.ok(
            index,
            grant=grant.id,
            fence=grant.fence,
            claims=[row.to_wire() for row in grant.claims],
        )

    def releasable(self) -> list[str]:
        """Grants this worker may release: all but the one it holds on purpose."""
        return [g for g in self.grants if g != self.held]

    async def release(self) -> None:
        """Release one of this worker's grants."""
        assert self.session is not None
        grants = self.releasable()
        grant = grants[self.rng.randrange(len(grants))]
        self.grants.remove(grant)
        index = self.rec.invoke("release", grant=grant)
        try:
            released = await self.session.release(grant=grant)
        except Exception as exc:
            self.completed_badly(index, exc)
            return
        self.rec.ok(index, released=released)

    async def renew(self) -> None:
        """Give one of this worker's grants a TTL."""
        assert self.session is not None
        grant = self.rng.choice(self.releasable())
        index = self.rec.invoke("renew", grant=grant, ttl=30.0)
        try:
            await self.session.renew(grant, 30.0)
        except Exception as exc:
            self.completed_badly(index, exc)
            return
        self.rec.ok(index)

    async def publish(self) -> None:
        """Publish a fact with a unique text on a random topic."""
        assert self.session is not None
        topic = self.rng.choice(TOPICS)
        text = f"{self.sid} learned {self.rng.getrandbits(32):08x}"
        index = self.rec.invoke("publish", topics=[topic], text=text)
        try:
            fact = await self.session.publish(topic, text=text)
        except Exception as exc:
            self.completed_badly(index, exc)
            return
        self.facts.append(fact.id)
        self.rec.ok(index, id=fact.id, seq=fact.seq)

    async def retract(self) -> None:
        """Retract one of this worker's facts."""
        assert self.session is not None
        fact_id = self.facts.pop(self.rng.randrange(len(self.facts)))
        index = self.rec.invoke("retract", id=fact_id)
        try:
            await self.session.retract(fact_id)
        except Exception as exc:
            self.completed_badly(index, exc)
            return
        self.rec.ok(index)

    async def query(self) -> None:
        """Query the retained facts of a random topic."""
        assert self.session is not None
        topic = self.rng.choice(TOPICS)
        index = self.rec.invoke("facts", scopes=[topic])
        try:
            found = await self.session.facts(topic, limit=10_000)
        except Exception as exc:
            self.completed_badly(index, exc)
            return
        self.rec.ok(index, ids=[fact.id for fact in found])

    def completed_badly(self, index: int, exc: Exception) -> None:
        """A refusal changed nothing; anything else may have taken effect.

        A wait that the broker ended is a refusal; a reply that never came,
        or a queued claim whose final answer never came, is unknown.
        """
        unanswered = isinstance(exc, BrokerUnavailable) or (
            isinstance(exc, TimedOut) and exc.message.startswith("no final answer")
        )
        definite = isinstance(exc, FleetbusError) and not unanswered
        if definite:
            self.rec.fail(index, getattr(exc, "code", type(exc).__name__))
        else:
            self.rec.unknown(index, f"{type(exc).__name__}: {exc}")

    async def settle(self) -> None:
        """Dump the replica whenever it matches the broker's head, until exit."""
        assert self.session is not None
        while not (self.dir / "quiet").exists():
            await asyncio.sleep(POLL_S)
        target = self.dir / f"{self.sid}.replica.json"
        while not (self.dir / "exit").exists():
            try:
                await self.session.wait_synced(timeout=2.0)
            except FleetbusError:
                await asyncio.sleep(POLL_S)
                continue
            dump: dict[str, Any] = self.session.view_snapshot()
            part = target.with_suffix(".part")
            part.write_bytes(orjson.dumps(dump))
            part.replace(target)
            await asyncio.sleep(POLL_S)
        await self.session.close()
        self.rec.close()


def args_url() -> str:
    """The broker URL the test gave this process."""
    import os

    return os.environ["FLEETBUS_URL"]


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and run one worker."""
    parser = argparse.ArgumentParser(prog="tests.faults.worker")
    parser.add_argument("dir", type=Path)
    parser.add_argument("sid")
    parser.add_argument("seed", type=int)
    parser.add_argument("--ops", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no-lease", action="store_true")
    parser.add_argument("--stall-after", type=int, default=-1)
    parser.add_argument("--stall-s", type=float, default=0.0)
    parser.add_argument("--hold", help="claim this scope first, exclusively")
    args = parser.parse_args(argv)
    asyncio.run(Worker(args).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
