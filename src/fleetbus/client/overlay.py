"""A session's own claim changes, known from replies before the replica has them.

The broker answers a claim or a release before it publishes the matching
event, so a replica learns of the session's own change a little later than the
session itself. :class:`OwnChanges` holds what the replies said until the
events arrive; the session merges it into every read of its replica, which
gives read-your-writes without waiting for the event.
"""

from __future__ import annotations

from collections.abc import Iterable

from fleetbus.claims import Claim, ClaimView


class OwnChanges:
    """Rows granted to and ids released by one session, not yet in its replica.

    A granted row stays until the replica has applied the event numbered with
    its fence; a released id stays until the replica has applied the grant and
    no longer holds the row. Claim ids are never reused, so neither test can
    go wrong once true.
    """

    __slots__ = ("_gone", "_granted")

    def __init__(self) -> None:
        self._granted: dict[str, Claim] = {}
        self._gone: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._granted or self._gone)

    def granted(self, rows: Iterable[Claim], applied: int) -> None:
        """Note rows a reply granted, unless the replica already has them."""
        for row in rows:
            if row.fence > applied:
                self._granted[row.id] = row

    def released(self, ids: Iterable[str], view: ClaimView) -> None:
        """Note ids a reply released, with the fence that first brings them."""
        for cid in ids:
            row = self._granted.pop(cid, None) or view.get(cid)
            self._gone[cid] = 0 if row is None else row.fence

    def prune(self, view: ClaimView, applied: int) -> None:
        """Forget what the replica now shows by itself."""
        if self._granted:
            self._granted = {
                cid: row for cid, row in self._granted.items() if row.fence > applied
            }
        if self._gone:
            self._gone = {
                cid: fence
                for cid, fence in self._gone.items()
                if fence > applied or view.get(cid) is not None
            }

    def merge(self, rows: list[Claim], path: str | None = None) -> list[Claim]:
        """``rows`` from the replica, without released ones, with granted ones.

        With ``path``, only granted rows whose scope matches it are added.
        """
        gone = self._gone
        if gone:
            rows = [row for row in rows if row.id not in gone]
        for row in self._granted.values():
            if path is None or row.scope.matches(path):
                rows.append(row)
        return rows
