"""The broker's heap of when each repository next has timed work."""

from __future__ import annotations

from fleetbus.broker.wakeups import Wakeups


def test_the_earliest_due_time_comes_first() -> None:
    wakeups = Wakeups()
    wakeups.set("b", 20.0)
    wakeups.set("a", 10.0)
    wakeups.set("c", 30.0)
    assert wakeups.first() == 10.0
    assert wakeups.pop_due(20.0) == ["a", "b"]
    assert wakeups.first() == 30.0
    assert len(wakeups) == 1


def test_setting_a_key_again_supersedes_its_time() -> None:
    """Later or earlier, only the last time set counts; a key set to None
    has nothing due."""
    wakeups = Wakeups()
    wakeups.set("a", 10.0)
    wakeups.set("a", 25.0)
    wakeups.set("b", 15.0)
    assert wakeups.first() == 15.0
    assert wakeups.pop_due(20.0) == ["b"]
    wakeups.set("a", 5.0)
    assert wakeups.pop_due(20.0) == ["a"]
    assert wakeups.pop_due(100.0) == []
    wakeups.set("c", 1.0)
    wakeups.set("c", None)
    assert wakeups.first() is None
    assert len(wakeups) == 0


def test_a_key_taken_out_is_due_again_only_once_set_again() -> None:
    wakeups = Wakeups()
    wakeups.set("a", 10.0)
    wakeups.set("a", 10.0)
    assert wakeups.pop_due(10.0) == ["a"]
    assert wakeups.pop_due(10.0) == []
    wakeups.set("a", 12.0)
    assert wakeups.pop_due(12.0) == ["a"]
