"""The session SDK: join a fleet, claim and release, read the claim replica.

:func:`connect` gives a blocking :class:`Session`; :meth:`AsyncSession.connect`
gives the asyncio core it runs on.
"""

from fleetbus.client.session import (
    AsyncSession,
    Grant,
    Session,
    SessionClosed,
    connect,
)
from fleetbus.client.transport import Transport, ZmqTransport, open_transport

__all__ = [
    "AsyncSession",
    "Grant",
    "Session",
    "SessionClosed",
    "Transport",
    "ZmqTransport",
    "connect",
    "open_transport",
]
