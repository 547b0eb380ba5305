"""``fleetbus demo``: a small fleet at work, to watch with ``tail`` or ``top``.

Starts a private broker (a temporary socket and store) unless ``--url`` names
one, then four simulated sessions work on the current repository: they claim,
collide, queue behind each other, share facts and leave. Every step is printed
as it happens; the demo ends by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fleetbus import log
from fleetbus.client import AsyncSession
from fleetbus.errors import BrokerUnavailable, Conflict
from fleetbus.ops.link import Link
from fleetbus.repo import RepoInfo, discover

STEP_S = 1.0
READY_TIMEOUT_S = 20.0
AREAS = (
    ("src/auth/", "src/auth/session.py", "rework the login flow"),
    ("src/billing/", "src/billing/invoice.py", "split invoice totals"),
    ("src/search/", "src/search/index.py", "make indexing incremental"),
)


class Demo:
    """The script of the demo, paced by ``speed``."""

    def __init__(self, url: str, repo: RepoInfo, speed: float) -> None:
        self.url = url
        self.repo = repo
        self.pause_s = STEP_S / max(speed, 0.01)

    def say(self, who: str, what: str) -> None:
        """One line of the story."""
        stamp = time.strftime("%H:%M:%S")
        sys.stdout.write(f"{stamp}  {who:<6} {what}\n")
        sys.stdout.flush()

    async def pause(self, steps: float = 1.0) -> None:
        """Give a watcher time to see the last step."""
        await asyncio.sleep(self.pause_s * steps)

    async def join(self, name: str) -> AsyncSession:
        """A simulated session called ``name``."""
        session = await AsyncSession.connect(
            self.url,
            repo=self.repo,
            session_id=f"demo-{name}",
            name=name,
            meta={"agent": "demo"},
        )
        self.say(name, "joins the fleet")
        return session

    async def round(self, number: int) -> None:
        """One round: a collision, a wait, shared claims, facts, departures."""
        area, file, intent = AREAS[number % len(AREAS)]
        alice, bob = await self.join("alice"), await self.join("bob")
        carol, dave = await self.join("carol"), await self.join("dave")
        await self.pause()

        grant = await alice.claim(area, intent=intent)
        self.say("alice", f"claims {area} to {intent} (fence {grant.fence})")
        await self.pause()

        try:
            await bob.claim(file, intent="fix a typo")
        except Conflict as exc:
            holder = exc.details.get("holders", [{}])[0]
            self.say("bob", f"is refused {file}: held by {holder.get('name')}")
        await self.pause()

        waiting = asyncio.ensure_future(
            bob.claim(file, intent="fix a typo", wait=60 * self.pause_s + 30)
        )
        self.say("bob", f"queues for {file} behind alice")
        await self.pause()

        await carol.claim("docs/", shared=True, intent="update the guides")
        await dave.claim("docs/", shared=True, intent="proofread")
        self.say("carol", "and dave share docs/ (shared claims coexist)")
        await self.pause()

        await alice.publish(
            area,
            text="tokens are cached for 60s: tests must clear the cache first",
            kind="gotcha",
        )
        self.say("alice", f"shares a gotcha on {area}")
        await self.pause()

        await dave.claim("@db-migrations", intent="add an index")
        self.say("dave", "claims the named resource @db-migrations")
        await carol.publish(
            "@build", text="we pin the test runner until CI is fixed", kind="decision"
        )
        self.say("carol", "records a decision on @build")
        await self.pause()

        await alice.release(grant=grant.id)
        self.say("alice", f"releases {area}")
        granted = await waiting
        self.say("bob", f"gets {file} at last (fence {granted.fence})")
        await self.pause()

        await bob.publish(file, text="the typo was in a log message only")
        self.say("bob", f"notes what he found in {file}")
        await self.pause()

        for session in (bob, carol, dave, alice):
            await session.close()
            self.say(session.name, "leaves; its claims are released")
            await self.pause(0.5)


async def play(url: str, repo: RepoInfo, speed: float, rounds: int) -> None:
    """Run ``rounds`` rounds of the demo against the broker at ``url``."""
    demo = Demo(url, repo, speed)
    for number in range(rounds):
        demo.say("demo", f"round {number + 1} of {rounds}")
        await demo.round(number)
    demo.say("demo", "done")


@contextmanager
def private_broker() -> Iterator[str]:
    """A broker on a temporary socket and store, stopped and removed on exit."""
    workdir = Path(tempfile.mkdtemp(prefix="fleetbus-demo-"))
    url = f"ipc://{workdir}/broker.sock"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fleetbus.broker",
            "--url",
            url,
            "--data",
            str(workdir / "data"),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_ready(url, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BrokerUnavailable("the demo's broker exited at start")
        with Link(url, timeout=0.2) as link:
            try:
                link.request("ping")
                return
            except BrokerUnavailable:
                continue
    raise BrokerUnavailable("the demo's broker did not start in time")


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit code."""
    log.configure("error")
    repo = discover()
    if args.url:
        asyncio.run(play(args.url, repo, args.speed, args.rounds))
        return 0
    with private_broker() as url:
        sys.stdout.write(
            f"broker on {url}\nwatch it from {repo.root}:\n"
            f"  fleetbus tail --url {url} --since 0\n"
            f"  fleetbus top --url {url}\n\n"
        )
        sys.stdout.flush()
        asyncio.run(play(url, repo, args.speed, args.rounds))
        if args.hold > 0:
            time.sleep(args.hold)
    return 0
