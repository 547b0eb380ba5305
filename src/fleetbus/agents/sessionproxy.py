"""The ``fleetbus`` CLI inside an agent session acts through that session's sidecar.

An agent runs ``fleetbus claim PATH`` from its shell to take a claim by hand
(to wait for a file another session holds, say). That claim belongs to the
agent's session, on its lease, so it must be made by the session's sidecar
rather than by a second, short-lived client under the same id.
:class:`SidecarSession` offers the few session methods the CLI's mutating
commands use, each one a request to the sidecar.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fleetbus.agents import hookclient
from fleetbus.claims import Claim
from fleetbus.facts import Fact


@dataclass(frozen=True)
class SidecarGrant:
    """A claim granted through the sidecar: its id, fencing token and rows."""

    id: str
    fence: int
    claims: list[Claim]


class SidecarSession:
    """Claim, release, publish and retract as the agent session ``sid``.

    ``implicit_ttl`` is the TTL the CLI passes when the user gave none: a
    claim with it lives on the session's lease instead, and so ends with the
    agent's session.
    """

    def __init__(self, sid: str, *, implicit_ttl: float | None = None) -> None:
        self.sid = sid
        self.implicit_ttl = implicit_ttl

    def __repr__(self) -> str:
        return f"<SidecarSession {self.sid!r}>"

    async def claim(
        self,
        *scopes: str,
        shared: bool = False,
        intent: str = "",
        ttl: float | None = None,
        wait: float | None = None,
    ) -> SidecarGrant:
        """See :meth:`fleetbus.client.AsyncSession.claim`."""
        if ttl is not None and ttl == self.implicit_ttl:
            ttl = None
        reply = self._call(
            {
                "op": "claim",
                "scopes": list(scopes),
                "shared": shared,
                "intent": intent,
                "ttl": ttl,
                "wait": wait,
            },
            wait,
        )
        rows = [Claim.from_wire(row) for row in reply.get("claims", [])]
        return SidecarGrant(str(reply["grant"]), int(reply["fence"]), rows)

    async def release(
        self, *scopes: str, grant: str | None = None, all: bool = False
    ) -> list[str]:
        """See :meth:`fleetbus.client.AsyncSession.release`."""
        reply = self._call(
            {"op": "release", "scopes": list(scopes), "grant": grant, "all": all}
        )
        return [str(cid) for cid in reply.get("released", [])]

    async def publish(
        self,
        *topics: str,
        text: str,
        kind: str | None = None,
        ttl: float | None = None,
        supersedes: str | None = None,
    ) -> Fact:
        """See :meth:`fleetbus.client.AsyncSession.publish`."""
        reply = self._call(
            {
                "op": "publish",
                "topics": list(topics),
                "text": text,
                "kind": kind,
                "ttl": ttl,
                "supersedes": supersedes,
            }
        )
        return Fact.from_wire(reply["fact"])

    async def retract(self, fact_id: str) -> Fact:
        """See :meth:`fleetbus.client.AsyncSession.retract`."""
        return Fact.from_wire(self._call({"op": "retract", "id": fact_id})["fact"])

    async def close(self, *, leave: bool = True) -> None:
        """Nothing to close: the sidecar keeps the session."""

    def _call(
        self, request: dict[str, Any], wait: float | None = None
    ) -> dict[str, Any]:
        timeout = hookclient.CALL_TIMEOUT_S + (wait or 0.0)
        return hookclient.call_sidecar(self.sid, request, timeout=timeout)


def attach(
    explicit_session: str | None, *, implicit_ttl: float | None = None
) -> SidecarSession | None:
    """The sidecar of the agent session this process runs in, if one answers.

    The session is the one the environment names, else that of the agent
    process this one runs under (:func:`hookclient.session_from_ancestry`).
    None when a session was named explicitly, when there is no such session,
    or when its sidecar is not running: the CLI then joins the fleet itself.
    """
    if explicit_session:
        return None
    sid = hookclient.session_from_env() or hookclient.session_from_ancestry()
    if sid is None or not hookclient.answers(sid):
        return None
    return SidecarSession(sid, implicit_ttl=implicit_ttl)
