"""The sidecar of one agent session: an SDK session that outlives each hook.

A coding agent runs a fresh hook process on every tool call, too short-lived
to join the fleet each time. The first hook of an agent session starts this
process (see :func:`fleetbus.agents.hookclient.ensure_sidecar`); it joins the
fleet under the agent's own session id, keeps the lease, the claim replica and
the record of facts already shown, and answers the hooks (and the ``fleetbus``
CLI run from the agent's shell) over a unix socket: one JSON request line, one
JSON reply line, ``{"ok": true, ...}`` or ``{"ok": false, "error": {...}}``.
A hook may instead send its agent's event as it came, framed without JSON
(:func:`fleetbus.agents.hookclient.answer_hook`); the sidecar then reads it
with the hook's own code and replies with what the hook is to write
(:meth:`Sidecar.hook`).

It ends when the agent's process ends, or on ``end`` (the agent's session
ended), SIGTERM or SIGINT, and leaves the fleet on the way out so its claims
are released at once. If it is killed outright, the broker lets its lease run
out instead.

Operations, by ``op``:

==============  =====================================================
``ping``        who the sidecar is and whether the broker is reachable
``pre_edit``    ``paths``: deny (who holds them) or claim; unseen facts
``facts_for``   ``paths``: facts on them not shown to this session yet
``pre_bash``    remember the worktree's changed files before a command
``post_bash``   changed files since ``pre_bash`` that others hold
``start``       the other sessions, their claims, facts not yet shown
``prompt``      new facts on the scopes this session holds
``end``         leave the fleet and exit
``claim``       ``scopes``, ``shared``, ``intent``, ``ttl``, ``wait``
``release``     ``scopes``, ``grant`` or ``all``
``claims``      ``mine``: the claim rows of the replica
``holders``     ``path``: the claims that match it
``publish``     ``topics``, ``text``, ``kind``, ``ttl``, ``supersedes``
``retract``     ``id``: withdraw a fact this session published
==============  =====================================================
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import inspect
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from fleetbus import log
from fleetbus.agents import hookclient, hooks
from fleetbus.agents.bytecode import cache_bytecode
from fleetbus.agents.hookclient import EXIT_BUSY, HOOK_MAGIC, sidecar_file
from fleetbus.agents.tidy import prune_sidecar_files
from fleetbus.claims import Claim
from fleetbus.client.session import AsyncSession
from fleetbus.errors import (
    BadInput,
    BadScope,
    BrokerUnavailable,
    Conflict,
    FleetbusError,
    ProtocolError,
)
from fleetbus.repo import RepoInfo, discover, repo_path

_log: Any = log.get("fleetbus.sidecar")

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

# The SDK's per-request patience: short, since a hook is waiting on it.
REQUEST_TIMEOUT_S = 2.0
# The patience once a request has gone unanswered and nothing has been heard
# from the broker since: enough for a broker that is back, not a stall per edit
# for one that is still away.
AWAY_TIMEOUT_S = 0.25
# A hook waits this long for a sidecar that is still joining the fleet; past
# it, the hook fails open (or closed) rather than stall the agent. A little
# longer than the first join attempt's own timeout, so that the hook reports
# why the join failed rather than that it has not finished.
CONNECT_TIMEOUT_S = REQUEST_TIMEOUT_S + 1.0
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 5.0
_READ_TIMEOUT_S = 10.0
_LEAVE_TIMEOUT_S = 2.0
_AGENT_POLL_S = 0.2
_MAX_REQUEST = 1024 * 1024
# A hook's event carries a whole file for a write: allow much more than a request.
_MAX_HOOK_EVENT = 64 * 1024 * 1024
_START_FACTS = 50
# How often, at most, the list of the repository's worktrees is read again.
_WORKTREES_REFRESH_S = 5.0


class Sidecar:
    """One agent session's stay in the fleet; see the module docstring."""

    def __init__(
        self,
        *,
        session_id: str,
        agent: str,
        agent_pid: int,
        repo: RepoInfo,
        url: str | None = None,
        autoclaim: bool = True,
    ) -> None:
        self.session_id = session_id
        self.agent = agent
        self.agent_pid = agent_pid
        self.repo = repo
        self.url = url
        self.autoclaim = autoclaim
        self.name = f"{agent}@{repo.branch or 'detached'}#{session_id[:8]}"
        self.session: AsyncSession | None = None
        self._ready = asyncio.Event()
        self._stopping = asyncio.Event()
        self._left = False
        self._problem = "the sidecar is still joining the fleet"
        # When a request to the broker last went unanswered (loop clock).
        self._unanswered_at: float | None = None
        self._worktree_roots = [repo.root]
        self._worktrees_read_at = -math.inf
        self._dirty: dict[str, tuple[str, int, int]] | None = None
        self._ops: dict[str, Handler] = {
            "ping": self._ping,
            "pre_edit": self._pre_edit,
            "facts_for": self._facts_for,
            "pre_bash": self._pre_bash,
            "post_bash": self._post_bash,
            "start": self._start,
            "prompt": self._prompt,
            "end": self._end,
            "claim": self._claim,
            "release": self._release,
            "claims": self._claims,
            "holders": self._holders,
            "publish": self._publish,
            "retract": self._retract,
        }

    def __repr__(self) -> str:
        state = "live" if self.session is not None else "down"
        return f"<Sidecar {self.name!r} agent_pid={self.agent_pid} {state}>"

    # -- lifecycle ------------------------------------------------------------

    async def run(self, path: str) -> None:
        """Serve on the socket at ``path`` until the agent or the session ends."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(
            self._serve, path=path, limit=_MAX_REQUEST
        )
        os.chmod(path, 0o600)
        tasks = [
            loop.create_task(self._connect()),
            loop.create_task(self._watch_agent()),
        ]
        _log.info("sidecar.started", sid=self.session_id, agent_pid=self.agent_pid)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._leave()
            _log.info("sidecar.stopped", sid=self.session_id)

    async def _connect(self) -> None:
        """Join the fleet, retrying with a backoff while the broker is away."""
        delay = _RETRY_FIRST_S
        while self.session is None:
            try:
                self.session = await AsyncSession.connect(
                    self.url,
                    repo=self.repo,
                    session_id=self.session_id,
                    name=self.name,
                    meta=self._meta(),
                    timeout=REQUEST_TIMEOUT_S,
                )
            except FleetbusError as exc:
                self._problem = exc.message
                self._ready.set()
                _log.warning("sidecar.join_failed", error=exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_S)
        self._ready.set()
        _log.info("sidecar.joined", sid=self.session_id, name=self.name)

    def _meta(self) -> dict[str, Any]:
        return {
            "host": socket.gethostname(),
            "pid": self.agent_pid,
            "sidecar_pid": os.getpid(),
            "worktree": str(self.repo.root),
            "branch": self.repo.branch,
            "agent": self.agent,
        }

    async def _watch_agent(self) -> None:
        """Stop the sidecar once the agent's process has ended."""
        await _wait_pid(self.agent_pid)
        _log.info("sidecar.agent_gone", agent_pid=self.agent_pid)
        self._stopping.set()

    async def _leave(self) -> None:
        if self._left:
            return
        self._left = True
        session, self.session = self.session, None
        if session is not None:
            with contextlib.suppress(FleetbusError, TimeoutError):
                await asyncio.wait_for(session.close(leave=True), _LEAVE_TIMEOUT_S)
            await self._forget(None)

    async def _live(self) -> AsyncSession:
        """The joined session; :class:`BrokerUnavailable` while there is none."""
        if self.session is None and not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT_S)
        if self.session is None:
            raise BrokerUnavailable(f"fleetbus broker unreachable: {self._problem}")
        return self.session

    # -- the socket -----------------------------------------------------------

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), _READ_TIMEOUT_S)
            if line.startswith(HOOK_MAGIC + b" "):
                writer.write(await self._hook_request(line, reader))
            else:
                reply = await self.answer(line)
                writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (
            OSError,
            TimeoutError,
            ValueError,
            asyncio.IncompleteReadError,
        ) as exc:
            _log.debug("sidecar.connection_failed", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        if self._left:
            self._stopping.set()

    async def answer(self, line: bytes) -> dict[str, Any]:
        """The reply line to one request line."""
        try:
            request = json.loads(line)
        except ValueError:
            return _error(ProtocolError("a request is one line of JSON"))
        return await self.answer_request(request)

    async def answer_request(self, request: Any) -> dict[str, Any]:
        """The reply to one request, decoded.

        Once a request has gone unanswered, the next ones wait only
        :data:`AWAY_TIMEOUT_S` for the broker until it is heard from again,
        so that a broker that went away stalls one edit, not every edit.
        """
        session = self.session
        if session is not None:
            session.timeout = (
                AWAY_TIMEOUT_S if self._broker_away(session) else REQUEST_TIMEOUT_S
            )
        try:
            if not isinstance(request, dict):
                raise ProtocolError("a request is one JSON object")
            handler = self._ops.get(str(request.get("op")))
            if handler is None:
                raise ProtocolError(f"unknown op {request.get('op')!r}")
            reply = {"ok": True, **await handler(request)}
            if session is not None and self._unanswered_at is not None:
                self._broker_away(session)
            return reply
        except ValueError:
            return _error(ProtocolError("a request is one line of JSON"))
        except BrokerUnavailable as exc:
            if session is not None and session is self.session:
                self._went_unanswered(session, exc)
            return _error(exc)
        except FleetbusError as exc:
            return _error(exc)
        except Exception as exc:
            _log.exception("sidecar.op_failed")
            return _error(FleetbusError(f"the sidecar failed: {exc!r}"))
        finally:
            if session is not None:
                session.timeout = REQUEST_TIMEOUT_S

    def _broker_away(self, session: AsyncSession) -> bool:
        """Whether a request went unanswered and no reply has come since."""
        since = self._unanswered_at
        if since is None:
            return False
        if session.replied_at > since:
            self._unanswered_at = None
            _log.info("sidecar.broker_back", sid=self.session_id)
            return False
        return True

    def _went_unanswered(self, session: AsyncSession, exc: BrokerUnavailable) -> None:
        if not self._broker_away(session):
            _log.warning("sidecar.broker_away", sid=self.session_id, error=exc.message)
        self._unanswered_at = asyncio.get_running_loop().time()

    async def _hook_request(self, line: bytes, reader: asyncio.StreamReader) -> bytes:
        """The reply to a hook's framed event, whose first line is ``line``."""
        framed = hookclient.read_hook_request(line)
        if framed is None or framed[1] + framed[2] > _MAX_HOOK_EVENT:
            return hookclient.HOOK_DECLINED
        agent, env_size, size = framed
        body = await asyncio.wait_for(
            reader.readexactly(env_size + size), _READ_TIMEOUT_S
        )
        try:
            env = hookclient.read_hook_env(body[:env_size])
            out = await self.hook(agent, env, body[env_size:])
        except Exception:
            _log.exception("sidecar.hook_failed")
            out = None
        return hookclient.hook_reply(None if out is None else (0, out))

    async def hook(self, agent: str, env: dict[str, str], data: bytes) -> bytes | None:
        """What ``fleetbus hook AGENT`` writes on stdout for the event ``data``.

        The event is read, acted on and answered by the same code as in the
        hook itself (:mod:`fleetbus.agents.hooks`), so the bytes are the same.
        None when the hook must answer itself: malformed input (its message
        goes to stderr), an event without its ``cwd`` or of another session,
        a check that runs git in the agent's environment.
        """
        adapter = hooks.agent_adapter(agent)
        if adapter is None:
            return None
        try:
            event = json.loads(data.decode())
            if not isinstance(event, dict) or not _text(event.get("cwd")):
                return None
            action = adapter.parse(event, env)
        except ValueError:
            return None
        if action is None:
            return hooks.answer_text(adapter.NO_ANSWER).encode()
        if action.session_id != self.session_id or hooks.runs_git(action):
            return None
        reply = await self.answer_request(hooks.request(action, env))
        # The hook would get the reply through JSON: the same types, then.
        sent = json.loads(json.dumps(reply, default=str))
        outcome = hooks.settle(action, sent, env)
        return hooks.answer_text(adapter.render(action, outcome)).encode()

    # -- operations for hooks -------------------------------------------------

    async def _ping(self, request: dict[str, Any]) -> dict[str, Any]:
        return {
            "sid": self.session_id,
            "name": self.name,
            "pid": os.getpid(),
            "agent_pid": self.agent_pid,
            "repo": self.repo.id,
            "joined": self.session is not None,
            "problem": None if self.session is not None else self._problem,
        }

    async def _pre_edit(self, request: dict[str, Any]) -> dict[str, Any]:
        inside = self._inside(_strings(request, "paths"))
        if not inside:
            return {"inside": []}
        session = await self._live()
        holders = _others(session, inside)
        claimed: list[str] = []
        autoclaim = request.get("autoclaim")
        if not holders and (self.autoclaim if autoclaim is None else autoclaim):
            wanted = [path for path in inside if not session.holders(path)]
            if wanted:
                intent = str(request.get("intent") or f"editing with {self.agent}")
                try:
                    grant = await session.claim(*wanted, intent=intent)
                except Conflict as exc:
                    holders = list(exc.details.get("holders", []))
                else:
                    claimed = [row.scope.text for row in grant.claims]
                    await self._record(grant.claims)
        facts = await self._unseen(session, inside) if request.get("facts", 1) else []
        return {
            "inside": inside,
            "deny": bool(holders),
            "holders": holders,
            "claimed": claimed,
            "facts": facts,
        }

    async def _facts_for(self, request: dict[str, Any]) -> dict[str, Any]:
        inside = self._inside(_strings(request, "paths"))
        if not inside:
            return {"facts": []}
        return {"facts": await self._unseen(await self._live(), inside)}

    async def _pre_bash(self, request: dict[str, Any]) -> dict[str, Any]:
        self._dirty = await self._worktree_changes()
        return {"files": len(self._dirty)}

    async def _post_bash(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        after = await self._worktree_changes()
        before = self._dirty
        self._dirty = after
        if before is None:
            changed = sorted(after)
        else:
            changed = sorted(
                p for p in after.keys() | before if after.get(p) != before.get(p)
            )
        conflicts = []
        for path in changed:
            holders = _others(session, [path])
            if holders:
                conflicts.append({"path": path, "holders": holders})
        return {"changed": changed, "conflicts": conflicts}

    async def _start(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        state = session.view_snapshot()
        claims: dict[str, list[dict[str, Any]]] = {}
        for row in state.get("claims", []):
            claims.setdefault(row["sid"], []).append(row)
        sessions = [
            {**info, "claims": claims.get(info["sid"], [])}
            for info in state.get("sessions", [])
            if info.get("sid") != self.session_id
        ]
        facts = await self._unseen(session, ["**"], mark=False)
        return {
            "name": self.name,
            "sessions": sessions,
            "facts": facts[-_START_FACTS:],
        }

    async def _prompt(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        scopes = sorted({row.scope.text for row in session.claims(mine=True)})
        facts = await self._unseen(session, scopes) if scopes else []
        return {"scopes": scopes, "facts": facts}

    async def _end(self, request: dict[str, Any]) -> dict[str, Any]:
        await self._leave()
        return {"left": True}

    # -- operations for the CLI -----------------------------------------------

    async def _claim(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        grant = await session.claim(
            *_strings(request, "scopes"),
            shared=bool(request.get("shared", False)),
            intent=str(request.get("intent") or ""),
            ttl=_seconds(request, "ttl"),
            wait=_seconds(request, "wait"),
        )
        await self._record(grant.claims)
        return {
            "grant": grant.id,
            "fence": grant.fence,
            "claims": [row.to_wire() for row in grant.claims],
        }

    async def _release(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        grant = request.get("grant")
        released = await session.release(
            *_strings(request, "scopes", required=False),
            grant=str(grant) if grant is not None else None,
            all=bool(request.get("all", False)),
        )
        await self._forget(released)
        return {"released": released}

    async def _claims(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        rows = session.claims(mine=bool(request.get("mine", False)))
        return {"sid": session.sid, "claims": [row.to_wire() for row in rows]}

    async def _holders(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        path = request.get("path")
        if not isinstance(path, str):
            raise BadInput("holders needs a 'path'", field="path")
        return {"claims": [row.to_wire() for row in session.holders(path)]}

    async def _publish(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        publish = getattr(session, "publish", None)
        if publish is None:
            raise BadInput("this fleetbus client cannot publish facts")
        options = {
            key: request[key]
            for key in ("kind", "supersedes")
            if isinstance(request.get(key), str)
        }
        fact = await _maybe_await(
            publish(
                *_strings(request, "topics"),
                text=str(request.get("text") or ""),
                ttl=_seconds(request, "ttl"),
                **options,
            )
        )
        return {"fact": _fact_wire(fact)}

    async def _retract(self, request: dict[str, Any]) -> dict[str, Any]:
        session = await self._live()
        retract = getattr(session, "retract", None)
        fact_id = request.get("id")
        if retract is None:
            raise BadInput("this fleetbus client cannot retract facts")
        if not isinstance(fact_id, str):
            raise BadInput("retract needs an 'id'", field="id")
        return {"fact": _fact_wire(await _maybe_await(retract(fact_id)))}

    # -- helpers --------------------------------------------------------------

    async def _record(self, claims: list[Claim]) -> None:
        """Note the grant's fencing tokens where the git guard checks them."""
        from fleetbus.agents import gitguard

        try:
            await asyncio.to_thread(
                gitguard.record_grant, self.repo.root, self.session_id, claims
            )
        except (FleetbusError, OSError) as exc:
            _log.debug("sidecar.fences_not_recorded", error=str(exc))

    async def _forget(self, ids: list[str] | None) -> None:
        """Drop recorded fences of released claims (of all when ``ids`` is None)."""
        from fleetbus.agents import gitguard

        try:
            await asyncio.to_thread(
                gitguard.forget_claims, self.repo.root, self.session_id, ids
            )
        except (FleetbusError, OSError) as exc:
            _log.debug("sidecar.fences_not_forgotten", error=str(exc))

    def _inside(self, paths: Iterable[str]) -> list[str]:
        """The repo-relative form of each path inside the repository, once each.

        Inside means in this worktree or, for an absolute path, in another
        worktree of the same repository: the deepest one that holds it, so a
        worktree nested in this one maps to its own paths.
        """
        found: dict[str, None] = {}
        for path in paths:
            relative = self._repo_relative(path)
            if relative is not None and relative not in (".", ""):
                found[relative] = None
        return list(found)

    def _repo_relative(self, path: str) -> str | None:
        roots = [self.repo.root]
        if os.path.isabs(path):
            roots = self._worktrees(path)
        for root in roots:
            try:
                return repo_path(path, replace(self.repo, root=root))
            except BadScope:
                continue
        return None

    def _worktrees(self, path: str) -> list[Path]:
        """The repository's worktree roots, deepest first, for absolute ``path``.

        Read from git once, and again (at most every few seconds) when a path
        lies in none of them: a worktree added since.
        """
        roots = self._worktree_roots
        known = any(_contains(root, path) for root in roots)
        now = time.monotonic()
        if not known and now - self._worktrees_read_at >= _WORKTREES_REFRESH_S:
            self._worktrees_read_at = now
            roots = self._worktree_roots = _worktree_roots(self.repo.root)
        return roots

    async def _unseen(
        self, session: AsyncSession, scopes: list[str], *, mark: bool = True
    ) -> list[dict[str, Any]]:
        """Facts on ``scopes`` not shown to this session yet, marked as shown."""
        unseen = getattr(session, "unseen", None)
        if unseen is None:
            return []
        try:
            facts = await _maybe_await(unseen(*scopes, mark=mark))
        except FleetbusError as exc:
            _log.warning("sidecar.facts_failed", error=exc.message)
            return []
        return [_fact_wire(fact) for fact in facts]

    async def _worktree_changes(self) -> dict[str, tuple[str, int, int]]:
        """Each changed or untracked file of the worktree: status, mtime, size."""
        process = await asyncio.create_subprocess_exec(
            "git",
            "-C",
            str(self.repo.root),
            "status",
            "--porcelain=v1",
            "-z",
            "--untracked-files=all",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await process.communicate()
        if process.returncode != 0:
            return {}
        return {
            path: (status, *_stat(self.repo.root / path))
            for status, path in parse_porcelain(out)
        }


def parse_porcelain(out: bytes) -> list[tuple[str, str]]:
    """``(status, path)`` pairs from ``git status --porcelain=v1 -z``.

    A rename or copy yields its new path and then its old one.
    """
    entries = out.decode(errors="surrogateescape").split("\0")
    pairs: list[tuple[str, str]] = []
    index = 0
    while index < len(entries):
        entry = entries[index]
        index += 1
        if len(entry) < 4:
            continue
        status, path = entry[:2], entry[3:]
        pairs.append((status, path))
        if status[0] in "RC" and index < len(entries):
            pairs.append((status, entries[index]))
            index += 1
    return pairs


def _stat(path: Path) -> tuple[int, int]:
    try:
        info = path.lstat()
    except OSError:
        return (-1, -1)
    return (info.st_mtime_ns, info.st_size)


def _others(session: AsyncSession, paths: list[str]) -> list[dict[str, Any]]:
    """Holders of ``paths`` other than ``session``, each claim once."""
    found: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in session.holders(path):
            if row.sid != session.sid:
                found[row.id] = row.holder()
    return list(found.values())


def _fact_wire(fact: Any) -> dict[str, Any]:
    if isinstance(fact, dict):
        return fact
    to_wire = getattr(fact, "to_wire", None)
    if to_wire is not None:
        data: dict[str, Any] = to_wire()
        return data
    keys = ("id", "seq", "topics", "body", "kind", "sid", "name", "at")
    return {key: getattr(fact, key, None) for key in keys}


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _strings(request: dict[str, Any], key: str, *, required: bool = True) -> list[str]:
    value = request.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadInput(f"{key!r} must be a list of strings", field=key)
    return value


def _seconds(request: dict[str, Any], key: str) -> float | None:
    value = request.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadInput(f"{key!r} must be a number of seconds", field=key)
    return float(value)


def _text(value: Any) -> bool:
    """Whether ``value`` is a non-empty string."""
    return isinstance(value, str) and bool(value)


def _error(exc: FleetbusError) -> dict[str, Any]:
    return {"ok": False, "error": exc.to_wire()}


async def _wait_pid(pid: int) -> None:
    """Return once process ``pid`` has ended (a zombie counts as ended)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        await _poll_pid(pid)
        return
    loop = asyncio.get_running_loop()
    ended = loop.create_future()
    loop.add_reader(fd, _settle, ended)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _poll_pid(pid: int) -> None:
    while _alive(pid):
        await asyncio.sleep(_AGENT_POLL_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[:1]
    except OSError:
        return True
    return state != [b"Z"]


def _autoclaim_default(repo: RepoInfo) -> bool:
    """``FLEETBUS_AUTOCLAIM``, else the repository's ``fleetbus.autoclaim``."""
    env = os.environ.get("FLEETBUS_AUTOCLAIM")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    done = subprocess.run(
        ["git", "-C", str(repo.root), "config", "--type=bool", "fleetbus.autoclaim"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() != "false"


def _hold_lock(path: str) -> IO[str] | None:
    """Take the lifetime lock and write our pid in it; None if it is held."""
    handle = open(path, "a+")  # noqa: SIM115 - held for the process lifetime
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _contains(root: Path, path: str) -> bool:
    return path == str(root) or path.startswith(str(root).rstrip("/") + "/")


def _worktree_roots(root: Path) -> list[Path]:
    """Every worktree of the repository at ``root``, deepest first."""
    done = subprocess.run(
        ["git", "-C", str(root), "worktree", "list", "--porcelain"],
        capture_output=True,
        text=True,
        check=False,
    )
    roots = {root}
    for line in done.stdout.splitlines():
        if line.startswith("worktree "):
            roots.add(Path(line.removeprefix("worktree ")))
    return sorted(roots, key=lambda p: len(p.parts), reverse=True)


def _tidy(session_id: str) -> None:
    """Remove the files other sessions' sidecars left long ago (a few stats)."""
    path = Path(sidecar_file(session_id, ".lock"))
    try:
        removed = prune_sidecar_files(
            path.parent, hookclient.session_key(session_id), now=time.time()
        )
    except OSError as exc:
        _log.warning("sidecar.tidy_failed", error=str(exc))
        return
    if removed:
        _log.info("sidecar.tidied", sessions=len(removed))


def main(argv: list[str] | None = None) -> int:
    """Run a sidecar: ``python -m fleetbus.agents.sidecar --session-id ID ...``."""
    parser = argparse.ArgumentParser(prog="fleetbus-sidecar", description=__doc__)
    parser.add_argument("--session-id", required=True)
    parser.add_argument("--agent", default="agent")
    parser.add_argument("--agent-pid", type=int, required=True)
    parser.add_argument("--cwd", default=os.getcwd())
    parser.add_argument("--url", default=None)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    global _log
    log.configure(args.log_level, json=True)
    # Bound after configuring: a logger bound earlier keeps the old settings.
    _log = log.get("fleetbus.sidecar")
    lock = _hold_lock(sidecar_file(args.session_id, ".lock"))
    if lock is None:
        print("another sidecar runs for this session", file=sys.stderr)
        return EXIT_BUSY
    try:
        written = cache_bytecode()
        if written:
            _log.debug("sidecar.bytecode_written", modules=written)
        _tidy(args.session_id)
        repo = discover(args.cwd)
        sidecar = Sidecar(
            session_id=args.session_id,
            agent=args.agent,
            agent_pid=args.agent_pid,
            repo=repo,
            url=args.url,
            autoclaim=_autoclaim_default(repo),
        )
        asyncio.run(sidecar.run(sidecar_file(args.session_id, ".sock")))
    finally:
        lock.truncate(0)
        lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
