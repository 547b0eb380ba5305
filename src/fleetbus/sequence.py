"""The per-repository sequence that orders every change.

Each change takes the next number. Events are published on streams (the claims
stream, facts streams); each event also carries ``prev``, the number of the
previous event on its own stream, so a subscriber that sees only some streams
can still tell a missed event from one that belongs to another stream.
"""

from __future__ import annotations

from typing import Any


class Sequence:
    """The sequence of one repository and the head of each of its streams."""

    __slots__ = ("_changed", "heads", "seq")

    def __init__(self, seq: int = 0, heads: dict[str, int] | None = None) -> None:
        self.seq = seq
        self.heads: dict[str, int] = dict(heads or {})
        self._changed: dict[str, int] = {}

    def stamp(self, stream: str, event: dict[str, Any]) -> dict[str, Any]:
        """Give ``event`` the next number and link it to its stream's head."""
        self.seq += 1
        event["seq"] = self.seq
        event["prev"] = self.heads.get(stream, 0)
        self.heads[stream] = self._changed[stream] = self.seq
        return event

    def head(self, stream: str) -> int:
        """The number of the last event on ``stream`` (0 before the first)."""
        return self.heads.get(stream, 0)

    def link(self, stream: str, seq: int) -> int:
        """Make the already numbered event ``seq`` the head of ``stream``.

        Returns the head it replaces, the event's ``prev`` on that stream. An
        event published on several streams takes one number with
        :meth:`next_number`, then is linked to each.
        """
        prev = self.heads.get(stream, 0)
        self.heads[stream] = self._changed[stream] = seq
        return prev

    def take_changed(self) -> dict[str, int]:
        """The heads moved since the last call, which forgets them.

        A repository accumulates one stream per fact topic ever used, so the
        store writes only these rather than every head on each commit.
        """
        changed, self._changed = self._changed, {}
        return changed

    def next_number(self) -> int:
        """Take a number for a change that publishes no event of its own."""
        self.seq += 1
        return self.seq


CLAIMS_STREAM = "claims"
