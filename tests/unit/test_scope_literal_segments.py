"""A literal segment is its own canonical text, so parsing may skip it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fleetbus.scope import _parse_segment, parse_scope

literal_segments = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs"), blacklist_characters="/*?[\\"
    ),
    min_size=1,
    max_size=40,
).filter(lambda s: s not in (".", ".."))


@given(literal_segments)
def test_a_literal_segment_parses_to_itself(segment: str) -> None:
    """The character-by-character parse of a literal segment changes nothing."""
    assert _parse_segment(segment)[0] == segment


@given(st.lists(literal_segments, min_size=1, max_size=6))
def test_a_literal_path_keeps_its_segments(segments: list[str]) -> None:
    """A path of literal segments is a literal scope with those segments."""
    text = "/".join(segments)
    if text.startswith("@"):
        text = "./" + text

    scope = parse_scope(text)

    assert scope.is_literal
    assert scope.segments == tuple(segments)
    assert scope.literal_prefix == tuple(segments)
