"""The one exception tree of fleetbus.

Every error a caller can act on derives from :class:`FleetbusError` and falls in
one family: the request was refused (:class:`Refused` and its kinds), the caller
sent something wrong (:class:`BadInput`), the broker could not be reached
(:class:`BrokerUnavailable`), a wait ran out (:class:`TimedOut`), the peer broke
the protocol (:class:`ProtocolError`), or the caller lacks the right
(:class:`NotAuthorised`).

Each class has a stable wire ``code``; :func:`error_from_wire` turns an error
reply back into the matching exception on the client side.
"""

from __future__ import annotations

from typing import Any, ClassVar


class FleetbusError(Exception):
    """Base of every fleetbus error.

    ``details`` carries structured data for the caller (the conflicting holders,
    the limit that was broken); ``exit_code`` is what the CLI exits with.
    """

    code: ClassVar[str] = "error"
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_wire(self) -> dict[str, Any]:
        """The error as it travels in a reply."""
        return {"code": self.code, "message": self.message, **self.details}


class Refused(FleetbusError):
    """The broker understood the request and said no."""

    code = "refused"


class Conflict(Refused):
    """Another session holds an overlapping scope; ``details["holders"]``."""

    code = "conflict"


class Deadlock(Refused):
    """Waiting would close a cycle of sessions; ``details["cycle"]``."""

    code = "deadlock"


class NotOwner(Refused):
    """Only the holder of a claim may release or renew it."""

    code = "not_owner"


class LimitExceeded(Refused):
    """A size, count or rate limit was reached; ``details["limit"]``."""

    code = "limit"


class TimedOut(FleetbusError):
    """A wait for a claim, or for a reply, ran out of time."""

    code = "timeout"


class BadInput(FleetbusError):
    """The caller sent something invalid; nothing was changed."""

    code = "bad_input"
    exit_code = 2


class BadScope(BadInput):
    """A scope broke one of the scope rules; ``details["rule"]`` says which."""

    code = "bad_scope"


class UnknownSession(BadInput):
    """The request named a session the broker does not know."""

    code = "unknown_session"


class ProtocolError(FleetbusError):
    """A message could not be decoded or does not follow the protocol."""

    code = "protocol"
    exit_code = 2


class NotAuthorised(FleetbusError):
    """The credential of the caller does not allow the request."""

    code = "not_authorised"


class BrokerUnavailable(FleetbusError):
    """The broker could not be reached or stopped answering."""

    code = "unavailable"
    exit_code = 3


_BY_CODE: dict[str, type[FleetbusError]] = {}


def _register(cls: type[FleetbusError]) -> None:
    _BY_CODE[cls.code] = cls
    for sub in cls.__subclasses__():
        _register(sub)


_register(FleetbusError)


def error_from_wire(payload: dict[str, Any]) -> FleetbusError:
    """Build the exception that an error reply describes."""
    fields = dict(payload)
    code = str(fields.pop("code", "error"))
    message = str(fields.pop("message", code))
    cls = _BY_CODE.get(code, FleetbusError)
    return cls(message, **fields)
