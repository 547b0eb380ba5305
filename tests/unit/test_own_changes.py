"""A session's own grants and releases show in its reads before their events."""

from __future__ import annotations

from fleetbus.claims import Claim, ClaimView
from fleetbus.client.overlay import OwnChanges
from fleetbus.scope import parse_scope


def _row(cid: str, scope: str, fence: int) -> Claim:
    return Claim(
        id=cid,
        sid="me",
        name="me",
        scope=parse_scope(scope),
        mode="exclusive",
        intent="",
        grant=f"g:{fence}",
        fence=fence,
        since=0.0,
        expires=None,
    )


def _granted_event(row: Claim) -> dict[str, object]:
    return {
        "type": "claim.granted",
        "seq": row.fence,
        "claims": [row.to_wire()],
    }


def test_a_granted_row_shows_until_its_event_is_applied() -> None:
    view, own = ClaimView(), OwnChanges()
    row = _row("c1", "src/a.py", fence=5)
    own.granted([row], applied=4)

    before = own.merge(view.claims(), "src/a.py")
    elsewhere = own.merge(view.holders("src/b.py"), "src/b.py")
    view.apply(_granted_event(row))
    own.prune(view, 5)

    assert before == [row]
    assert elsewhere == []
    assert own.merge(view.claims()) == [row]
    assert not own


def test_a_row_the_replica_already_has_is_not_added_twice() -> None:
    view, own = ClaimView(), OwnChanges()
    row = _row("c1", "src/a.py", fence=5)
    view.apply(_granted_event(row))

    own.granted([row], applied=5)

    assert own.merge(view.claims()) == [row]


def test_a_released_row_hides_until_its_release_is_applied() -> None:
    view, own = ClaimView(), OwnChanges()
    row = _row("c1", "src/a.py", fence=5)
    view.apply(_granted_event(row))

    own.released(["c1"], view)
    own.prune(view, 5)
    hidden = own.merge(view.claims())
    view.apply({"type": "claim.released", "seq": 6, "ids": ["c1"]})
    own.prune(view, 6)

    assert hidden == []
    assert not own


def test_released_before_its_grant_arrives_stays_hidden_through_both() -> None:
    view, own = ClaimView(), OwnChanges()
    row = _row("c1", "src/a.py", fence=5)
    own.granted([row], applied=4)
    own.released(["c1"], view)

    view.apply(_granted_event(row))
    own.prune(view, 5)
    between = own.merge(view.claims())
    view.apply({"type": "claim.released", "seq": 6, "ids": ["c1"]})
    own.prune(view, 6)

    assert between == []
    assert view.claims() == []
    assert not own
