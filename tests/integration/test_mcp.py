"""The MCP server's tools against a real broker: in memory, and once over stdio."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp.client import Client
from mcp.client.stdio import StdioServerParameters

from fleetbus.agents import gitguard
from fleetbus.agents.hookclient import SESSION_ENVS, sidecar_file
from fleetbus.agents.install import fleetbus_executable
from fleetbus.agents.mcp_server import AgentSession, build_server
from fleetbus.client import Session, connect
from fleetbus.repo import discover
from tests.support.brokerproc import BrokerProcess

TOOLS = {
    "claim",
    "release",
    "list_claims",
    "who_holds",
    "publish_fact",
    "query_facts",
    "whats_new",
}


@pytest.fixture
def repo(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp))
    root = short_tmp / "repo"
    root.mkdir()
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for name in ("a.py", "b.py"):
        (root / name).write_text(f"# {name}\n")
    git = ["git", "-C", str(root), "-c", "user.name=T", "-c", "user.email=t@e"]
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "start"], check=True)
    return root


@pytest.fixture
def bob(repo: Path, broker: BrokerProcess) -> Iterator[Session]:
    """Another session of the fleet, through the SDK."""
    session = connect(broker.url, repo=repo, session_id="bob", name="bob")
    yield session
    session.close()


@contextlib.asynccontextmanager
async def tools(repo: Path, url: str, sid: str = "agent-1") -> AsyncIterator[Client]:
    """An MCP client talking to the server in memory, acting as ``sid``."""
    agent = AgentSession(discover(repo), sid, url)
    async with Client(build_server(agent), mode="legacy") as client:
        yield client


async def call(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert not result.is_error, result.content
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text


async def refused(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    text: str = result.content[0].text  # type: ignore[union-attr]
    return text


async def test_lists_the_seven_tools(repo: Path, broker: BrokerProcess) -> None:
    """Every tool is offered, with a description for the model."""
    async with tools(repo, broker.url) as client:
        listed = (await client.list_tools()).tools

    assert {tool.name for tool in listed} == TOOLS
    assert all(tool.description for tool in listed)


async def test_claim_is_seen_by_other_sessions_and_recorded(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """A claim through the tool is the agent session's claim, fence recorded."""
    async with tools(repo, broker.url) as client:
        text = await call(client, "claim", scopes=["a.py"], intent="fix the bug")
        bob.wait_synced()

        assert "a.py is held by" in text
        assert "fix the bug" in text
        holders = bob.holders("a.py")
        assert [row.sid for row in holders] == ["agent-1"]
        fences = gitguard.recorded_fences(repo, "agent-1")
        assert [(f.scope, f.fence) for f in fences.values()] == [
            ("a.py", holders[0].fence)
        ]


async def test_refusal_is_a_tool_error_naming_the_holder(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """A conflicting claim comes back as an error with who, what and why."""
    bob.claim("b.py", intent="rename helpers")

    async with tools(repo, broker.url) as client:
        text = await refused(client, "claim", scopes=["b.py"], intent="edit")

    assert "bob" in text
    assert "rename helpers" in text


async def test_claim_waits_until_the_holder_releases(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """``wait`` queues the claim; it is granted when the holder lets go."""
    grant = bob.claim("b.py", intent="short job")
    queued = asyncio.Event()
    loop = asyncio.get_running_loop()
    bob.on_event(
        lambda event: (
            loop.call_soon_threadsafe(queued.set)
            if event.get("type") == "wait.queued"
            else None
        )
    )

    async with tools(repo, broker.url) as client:
        waiting = asyncio.create_task(
            call(client, "claim", scopes=["b.py"], intent="next", wait=20)
        )
        await asyncio.wait_for(queued.wait(), 10)
        await asyncio.to_thread(bob.release, grant=grant.id)
        text = await asyncio.wait_for(waiting, 10)

    assert "b.py is held by" in text


async def test_who_holds_list_and_release(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """who_holds and list_claims read the table; release frees and forgets."""
    bob.claim("b.py", intent="theirs")
    async with tools(repo, broker.url) as client:
        await call(client, "claim", scopes=["a.py"], intent="mine")

        assert "held by bob" in await call(client, "who_holds", path="b.py")
        assert "nobody holds" in await call(client, "who_holds", path="c.py")
        mine = await call(client, "list_claims", mine=True)
        assert "a.py" in mine
        assert "b.py" not in mine
        everyone = await call(client, "list_claims")
        assert "a.py" in everyone
        assert "b.py" in everyone

        assert await call(client, "release", scopes=["a.py"]) == "released 1 claim"
        assert await call(client, "list_claims", mine=True) == "no claims"
        assert "say what to release" in await refused(client, "release")

    assert gitguard.recorded_fences(repo, "agent-1") == {}


async def test_facts_publish_query_and_whats_new(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """Facts go out through the tool, come back by query, and once as news."""
    async with tools(repo, broker.url) as client:
        await call(client, "claim", scopes=["a.py"], intent="work")
        published = await call(
            client,
            "publish_fact",
            topics=["@build"],
            text="make test needs docker",
            kind="gotcha",
        )
        bob.publish("a.py", text="a.py parses dates in UTC", kind="warning")

        assert "[gotcha] @build: make test needs docker" in published
        news = await call(client, "whats_new")
        assert "a.py parses dates in UTC" in news
        assert "by bob" in news
        assert await call(client, "whats_new") == "nothing new"
        found = await call(client, "query_facts", kind="gotcha")
        assert "make test needs docker" in found
        assert "dates" not in found
        by_scope = await call(client, "query_facts", scope="a.py")
        assert "dates in UTC" in by_scope
        assert "docker" not in by_scope
        assert "docker" in await call(client, "query_facts", search="docker")


async def test_bad_scope_is_a_readable_tool_error(
    repo: Path, broker: BrokerProcess
) -> None:
    """A scope outside the repository is refused with the rule it broke."""
    async with tools(repo, broker.url) as client:
        text = await refused(client, "claim", scopes=["../outside.py"])

    assert "outside.py" in text or ".." in text


async def test_tools_go_through_a_running_sidecar(
    repo: Path, broker: BrokerProcess
) -> None:
    """With a sidecar answering for the session, the tools ask it."""
    seen: list[dict[str, Any]] = []

    async def answer(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        seen.append(json.loads(await reader.readline()))
        writer.write(b'{"ok": true, "sid": "agent-1", "claims": []}\n')
        await writer.drain()
        writer.close()

    path = sidecar_file("agent-1", ".sock")
    server = await asyncio.start_unix_server(answer, path=str(path))
    try:
        async with tools(repo, broker.url) as client:
            text = await call(client, "list_claims", mine=True)
    finally:
        server.close()
        await server.wait_closed()

    assert text == "no claims"
    assert seen == [{"op": "claims", "mine": True}]


async def test_stdio_subprocess_round_trip(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """``fleetbus mcp`` as a real child process over stdio claims for its session."""
    params = StdioServerParameters(
        command=fleetbus_executable(),
        args=["mcp", "--url", broker.url, "--session", "agent-stdio"],
        cwd=repo,
        env={"XDG_RUNTIME_DIR": str(repo.parent)},
    )
    async with Client(params) as client:
        text = await call(client, "claim", scopes=["a.py"], intent="over stdio")
        bob.wait_synced()
        holders = bob.holders("a.py")

    assert "over stdio" in text
    assert [row.sid for row in holders] == ["agent-stdio"]


async def test_query_before_joining_reads_without_a_session(
    repo: Path, broker: BrokerProcess, bob: Session
) -> None:
    """A query alone does not join the fleet as the agent's session."""
    bob.publish("@build", text="use make, not tox", kind="decision")

    async with tools(repo, broker.url) as client:
        found = await call(client, "query_facts", scope="@build")
        bob.wait_synced()
        sessions = set(bob.core.sessions)

    assert "[decision] @build: use make, not tox" in found
    assert "agent-1" not in sessions


async def test_without_an_id_the_session_is_the_sidecar_of_the_agent_above(
    repo: Path, broker: BrokerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Codex names no session: the tools act as its sidecar's, found at first use."""
    for name in SESSION_ENVS:
        monkeypatch.delenv(name, raising=False)
    agent = AgentSession(discover(repo), None, broker.url)
    # Started after the server, as an agent's first hook starts its sidecar;
    # its agent is this process's parent, as Codex is its MCP server's.
    fake = subprocess.Popen(
        [
            *(sys.executable, "-c", "import sys; print(); sys.stdin.read()"),
            *("fleetbus.agents.sidecar", "--session-id", "codex-9"),
            *("--agent-pid", str(os.getppid())),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert fake.stdout is not None
        fake.stdout.readline()
        Path(sidecar_file("codex-9", ".lock")).write_text(f"{fake.pid}\n")
        async with Client(build_server(agent), mode="legacy") as client:
            await call(client, "claim", scopes=["a.py"], intent="codex work")
    finally:
        fake.communicate(b"")

    assert agent.sid == "codex-9"
    assert gitguard.recorded_fences(repo, "codex-9") != {}
