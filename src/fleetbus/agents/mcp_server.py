"""The fleetbus tools over the Model Context Protocol: ``fleetbus mcp``.

An agent that speaks MCP gets seven tools: ``claim``, ``release``,
``list_claims``, ``who_holds``, ``publish_fact``, ``query_facts`` and
``whats_new``. They act as the agent's own session, named by the session id
the agent exports (``CLAUDE_CODE_SESSION_ID`` and the like), so claims taken
here are the same claims its hooks and its git guard see.

When a sidecar runs for that session (:mod:`fleetbus.agents.sidecar`), the
tools go through it; otherwise the server joins the fleet itself, with a
leased session under that id. Claims granted here are recorded for the git
guard's fence check (:func:`fleetbus.agents.gitguard.record_grant`). A refusal
or any other fleetbus error comes back as a tool error carrying its message.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from fleetbus.agents import gitguard
from fleetbus.agents.hookclient import (
    CALL_TIMEOUT_S,
    answers,
    call_sidecar,
    session_from_ancestry,
    session_from_env,
)
from fleetbus.claims import Claim
from fleetbus.client import AsyncSession
from fleetbus.errors import BadInput, FleetbusError
from fleetbus.repo import RepoInfo, discover

INSTRUCTIONS = """\
fleetbus coordinates the agent sessions working in this repository at once.
Claim what you are about to edit (files, directories like src/auth/, globs, or
@resources) and say why; a refusal names who holds it and why. Publish what
others should know as a fact on the paths it concerns; call whats_new to read
what others published about the paths you hold.
"""


def agent_session_id(explicit: str | None = None) -> str:
    """The session the tools act as: explicit, the agent's, else the CLI's.

    The agent's is the one its environment names, else that of the running
    sidecar whose agent started this server (Codex names none).
    """
    found = explicit or session_from_env() or session_from_ancestry()
    if found:
        return found
    from fleetbus.cli import session_id

    return session_id()


class AgentSession:
    """The agent's session as the tools use it: through its sidecar, or direct.

    Every operation answers with plain data (claim rows and facts in their
    wire form) and raises :class:`~fleetbus.errors.FleetbusError` when refused.
    Without a ``session_id``, the session is settled at the first use (see
    :func:`agent_session_id`): an agent starts its MCP servers before its first
    hook has started the session's sidecar.
    """

    def __init__(
        self, repo: RepoInfo, session_id: str | None, url: str | None = None
    ) -> None:
        self.repo = repo
        self._sid = session_id
        self.url = url
        self._direct: AsyncSession | None = None
        self._reader: AsyncSession | None = None
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        mode = "direct" if self._direct is not None else "idle"
        return f"<AgentSession {self._sid!r} repo={self.repo.id!r} {mode}>"

    @property
    def sid(self) -> str:
        """The session the tools act as."""
        if self._sid is None:
            self._sid = agent_session_id()
        return self._sid

    async def close(self) -> None:
        """Drop the connections; claims stay with the session's lease."""
        for session in (self._direct, self._reader):
            if session is not None:
                await session.close(leave=False)
        self._direct = self._reader = None

    # -- operations -----------------------------------------------------------

    async def claim(
        self,
        scopes: list[str],
        *,
        intent: str,
        shared: bool,
        wait: float | None,
        ttl: float | None,
    ) -> list[Claim]:
        """Claim ``scopes`` all or nothing; the granted rows."""
        request = {
            "op": "claim",
            "scopes": scopes,
            "intent": intent,
            "shared": shared,
            "wait": wait,
            "ttl": ttl,
        }
        reply = await self._via_sidecar(request, patience=wait)
        if reply is not None:
            rows = [Claim.from_wire(row) for row in reply.get("claims", [])]
        else:
            session = await self._session()
            grant = await session.claim(
                *scopes, intent=intent, shared=shared, wait=wait, ttl=ttl
            )
            rows = grant.claims
        gitguard.record_grant(self.repo.root, self.sid, rows)
        return rows

    async def release(
        self, scopes: list[str], *, grant: str | None, all: bool
    ) -> list[str]:
        """Release claims by scope, by grant or all; the released ids."""
        request = {"op": "release", "scopes": scopes, "grant": grant, "all": all}
        reply = await self._via_sidecar(request)
        if reply is not None:
            released = [str(cid) for cid in reply.get("released", [])]
        else:
            session = await self._session()
            released = await session.release(*scopes, grant=grant, all=all)
        gitguard.forget_claims(self.repo.root, self.sid, released)
        return released

    async def claims(self, *, mine: bool) -> list[Claim]:
        """The claims of the fleet, or this session's."""
        reply = await self._via_sidecar({"op": "claims", "mine": mine})
        if reply is not None:
            return [Claim.from_wire(row) for row in reply.get("claims", [])]
        return (await self._session()).claims(mine=mine)

    async def holders(self, path: str) -> list[Claim]:
        """The claims that cover ``path``."""
        reply = await self._via_sidecar({"op": "holders", "path": path})
        if reply is not None:
            return [Claim.from_wire(row) for row in reply.get("claims", [])]
        return (await self._session()).holders(path)

    async def publish(
        self, topics: list[str], text: str, kind: str | None
    ) -> dict[str, Any]:
        """Publish a fact; the fact as stored."""
        request = {"op": "publish", "topics": topics, "text": text, "kind": kind}
        reply = await self._via_sidecar(request)
        if reply is not None:
            fact: dict[str, Any] = reply["fact"]
            return fact
        session = await self._session()
        return (await session.publish(*topics, text=text, kind=kind)).to_wire()

    async def query(
        self, scope: str | None, kind: str | None, search: str | None
    ) -> list[dict[str, Any]]:
        """Retained live facts, filtered; a read that needs no session."""
        reader = await self._read_only()
        scopes = [scope] if scope else []
        found = await reader.facts(*scopes, kind=kind, search=search or None)
        return [fact.to_wire() for fact in found]

    async def whats_new(self) -> list[dict[str, Any]]:
        """Facts on the scopes this session holds that it has not been shown."""
        reply = await self._via_sidecar({"op": "prompt"})
        if reply is not None:
            return list(reply.get("facts", []))
        session = await self._session()
        if not session.claims(mine=True):
            return []
        return [fact.to_wire() for fact in await session.unseen()]

    # -- connections ----------------------------------------------------------

    async def _via_sidecar(
        self, request: dict[str, Any], *, patience: float | None = None
    ) -> dict[str, Any] | None:
        """The sidecar's reply, or None when no sidecar serves this session.

        Once the server has joined by itself it stays joined, so that one
        session's operations do not hop between two connections.
        """
        if self._direct is not None or not answers(self.sid):
            return None
        timeout = CALL_TIMEOUT_S + (patience or 0.0)
        return await asyncio.to_thread(call_sidecar, self.sid, request, timeout=timeout)

    async def _session(self) -> AsyncSession:
        async with self._lock:
            if self._direct is None:
                self._direct = await AsyncSession.connect(
                    self.url,
                    repo=self.repo,
                    session_id=self.sid,
                    name=f"mcp#{self.sid[:8]}",
                    meta={"agent": "mcp"},
                )
            return self._direct

    async def _read_only(self) -> AsyncSession:
        if self._direct is not None:
            return self._direct
        async with self._lock:
            if self._reader is None:
                self._reader = await AsyncSession.connect(
                    self.url, repo=self.repo, join=False, replica=False
                )
            return self._reader


# -- rendering ------------------------------------------------------------------


def _when(wall: float | None) -> str:
    if wall is None:
        return "?"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(wall))


def render_claims(rows: list[Claim], *, empty: str) -> str:
    """Claim rows as readable lines, with grant and fence for each."""
    if not rows:
        return empty
    return "\n".join(
        f"{row.describe()} [grant {row.grant}, fence {row.fence}]" for row in rows
    )


def render_facts(facts: list[dict[str, Any]], *, empty: str) -> str:
    """Facts as readable lines: kind, topics, text, author, time and id."""
    if not facts:
        return empty
    lines = []
    for fact in facts:
        topics = ", ".join(fact.get("topics") or [])
        author = fact.get("name") or fact.get("sid") or "?"
        lines.append(
            f"[{fact.get('kind', 'note')}] {topics}: {fact.get('body', '')} "
            f"(by {author}, {_when(fact.get('at'))}, id {fact.get('id')})"
        )
    return "\n".join(lines)


# -- the server -----------------------------------------------------------------


def build_server(agent: AgentSession) -> MCPServer[Any]:
    """An MCP server whose tools act as ``agent``; it closes ``agent`` at exit."""

    @contextlib.asynccontextmanager
    async def lifespan(_: MCPServer[Any]) -> AsyncIterator[None]:
        try:
            yield None
        finally:
            await agent.close()

    server: MCPServer[Any] = MCPServer(
        "fleetbus", instructions=INSTRUCTIONS, lifespan=lifespan, log_level="WARNING"
    )

    @server.tool()
    async def claim(
        scopes: list[str],
        intent: str = "",
        shared: bool = False,
        wait: float | None = None,
        ttl: float | None = None,
    ) -> str:
        """Claim files, directories (ending in /), globs or @resources before
        editing them, all or nothing. Say why in ``intent``. ``shared`` claims
        coexist with other shared ones. ``wait`` queues for up to that many
        seconds instead of being refused; ``ttl`` (seconds) keeps the claim
        beyond this session. A refusal names the holder and their intent."""
        async with _tool_errors():
            rows = await agent.claim(
                scopes, intent=intent, shared=shared, wait=wait, ttl=ttl
            )
        return "claimed:\n" + render_claims(rows, empty="nothing")

    @server.tool()
    async def release(
        scopes: list[str] | None = None, grant: str | None = None, all: bool = False
    ) -> str:
        """Release this session's claims on ``scopes``, those of one ``grant``,
        or ``all`` of them, once the work on them is done (committed)."""
        if not scopes and grant is None and not all:
            raise ToolError("say what to release: scopes, a grant, or all")
        async with _tool_errors():
            released = await agent.release(scopes or [], grant=grant, all=all)
        count = len(released)
        return f"released {count} claim{'s' * (count != 1)}"

    @server.tool()
    async def list_claims(mine: bool = False) -> str:
        """List the claims held in this repository (only this session's with
        ``mine``): scope, holder, intent, since when, grant and fence."""
        async with _tool_errors():
            rows = await agent.claims(mine=mine)
        return render_claims(rows, empty="no claims")

    @server.tool()
    async def who_holds(path: str) -> str:
        """Who holds a claim covering ``path`` (repo-relative or absolute)."""
        async with _tool_errors():
            rows = await agent.holders(path)
        return render_claims(rows, empty=f"nobody holds {path}")

    @server.tool()
    async def publish_fact(topics: list[str], text: str, kind: str = "note") -> str:
        """Share a short finding with the other sessions: a flaky test, a
        gotcha, a decision. ``topics`` are the paths, directories or @topics it
        is about; ``kind`` is note, warning, decision, gotcha or question."""
        async with _tool_errors():
            fact = await agent.publish(topics, text, kind)
        return "published: " + render_facts([fact], empty="")

    @server.tool()
    async def query_facts(
        scope: str | None = None, kind: str | None = None, search: str | None = None
    ) -> str:
        """Facts the sessions published, on ``scope`` (a path, directory, glob
        or @topic; all when omitted), of one ``kind``, with every word of
        ``search`` in their text."""
        async with _tool_errors():
            facts = await agent.query(scope, kind, search)
        return render_facts(facts, empty="no facts")

    @server.tool()
    async def whats_new() -> str:
        """Facts published about the scopes this session holds that it has
        not seen yet; each is shown once."""
        async with _tool_errors():
            facts = await agent.whats_new()
        return render_facts(facts, empty="nothing new")

    return server


@contextlib.asynccontextmanager
async def _tool_errors() -> AsyncIterator[None]:
    """A fleetbus error as a tool error with its readable message."""
    try:
        yield
    except FleetbusError as exc:
        raise ToolError(exc.message) from exc


def serve(
    *,
    repo: str | Path | None = None,
    url: str | None = None,
    session_id: str | None = None,
) -> int:
    """Serve the tools over stdio until the client hangs up; the exit code."""
    from fleetbus import log

    # stdout carries the protocol: every log line goes to stderr.
    log.configure("warning", stream=sys.stderr)
    if repo is not None and not Path(repo).is_dir():
        raise BadInput(f"no such directory: {repo}")
    agent = AgentSession(discover(repo), session_id, url)
    build_server(agent).run("stdio")
    return 0
