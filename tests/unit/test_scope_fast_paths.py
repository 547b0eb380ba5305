"""The fast paths of the scope module agree with the slow ones they stand for."""

from __future__ import annotations

import copy
import pickle
from collections import Counter
from collections.abc import Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetbus import scope as scope_module
from fleetbus.errors import BadScope
from fleetbus.scope import (
    MAX_SEGMENT_LEN,
    MAX_SEGMENTS,
    Scope,
    ScopeIndex,
    _parse_cached,
    literal_scope,
    overlaps,
    parse_scope,
)

# Texts near every rule a literal fast path could get wrong.
PIECES = ["a", "b", ".", "..", "", ".x", "@x", "*", "a?", "[a]", "\\", "\x01", "é"]
odd_text = st.lists(st.sampled_from(PIECES), min_size=1, max_size=5).map("/".join)
any_text = st.one_of(odd_text, st.text(max_size=12))

TOKENS = ["a", "b", "*", "?", "[ab]"]
segment_text = st.lists(st.sampled_from(TOKENS), min_size=1, max_size=2).map("".join)
pattern_text = st.builds(
    lambda segments, slash: "/".join(segments) + slash,
    st.lists(
        st.one_of(segment_text, st.sampled_from(["a", "b", "ab", "**"])),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from(["", "/"]),
)
literal_text = st.lists(
    st.sampled_from(["a", "b", "ab", "ba"]), min_size=1, max_size=4
).map("/".join)
scope_text = st.one_of(
    pattern_text, literal_text, literal_text, st.sampled_from(["@a", "@db"])
)
path_text = st.one_of(literal_text, st.sampled_from(["@a", "@db"]))


def slow_parse(text: str) -> Scope | None:
    """parse_scope without its literal shortcut and cache, or None if refused."""
    fast = scope_module.literal_scope
    scope_module.literal_scope = lambda text: None  # type: ignore[assignment]
    try:
        return _parse_cached.__wrapped__(text)
    except BadScope:
        return None
    finally:
        scope_module.literal_scope = fast


@settings(max_examples=400, deadline=None)
@given(any_text)
def test_literal_scope_agrees_with_the_full_parse(text: str) -> None:
    """A text literal_scope takes parses, in full, to the same literal scope."""
    fast = literal_scope(text)
    slow = slow_parse(text)

    if fast is not None:
        assert slow is not None
        assert slow.is_literal
        assert (fast.text, fast.segments, fast.literal_prefix) == (
            slow.text,
            slow.segments,
            slow.literal_prefix,
        )
        assert fast.is_literal
        assert not fast.is_resource
    # Every canonical literal path but "./@name" (whose text is not its path).
    if slow is not None and slow.is_literal and text == "/".join(slow.segments):
        assert fast is not None


def test_literal_scope_refuses_what_is_not_a_canonical_literal() -> None:
    """Globs, directories, resources and texts parse_scope would change are left."""
    too_deep = "/".join(["a"] * (MAX_SEGMENTS + 1))
    too_long = "a" * (MAX_SEGMENT_LEN + 1)
    refused = ["a/*", "a/", "@db", "./a", "a//b", "a/./b", "a/../b", "./@x", "a\\b"]

    for text in [*refused, too_deep, too_long, "", "a\x00b"]:
        assert literal_scope(text) is None, text
    assert literal_scope("src/.github/x.py") == parse_scope("src/.github/x.py")


def test_a_scope_is_immutable_and_survives_copy_and_pickle() -> None:
    """Setting a field fails; copies and pickles equal the original."""
    scope = parse_scope("src/a.py")

    with pytest.raises(AttributeError):
        scope.text = "other"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del scope.segments  # type: ignore[misc]
    assert copy.deepcopy(scope) == scope
    assert pickle.loads(pickle.dumps(parse_scope("src/*.py"))) == parse_scope(
        "src/*.py"
    )
    assert hash(literal_scope("src/a.py")) == hash(scope)
    assert sorted([parse_scope("b"), parse_scope("a/")]) == [
        parse_scope("a/"),
        parse_scope("b"),
    ]


def bag(entries: Iterable[tuple[Scope, int]]) -> Counter[tuple[str, int]]:
    return Counter((scope.text, item) for scope, item in entries)


operation = st.tuples(st.sampled_from(["add", "discard", "query"]), scope_text)


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=40), st.booleans(), path_text)
def test_the_index_equals_a_list_through_adds_and_discards(
    ops: list[tuple[str, str]], eager: bool, path: str
) -> None:
    """Lookups between any mix of adds and discards equal a scan of a list.

    Covers the path dictionary, a path held several times, and the tree of
    literal paths built up front or on the first pattern query.
    """
    index: ScopeIndex[int] = ScopeIndex(eager=eager)
    entries: list[tuple[Scope, int]] = []
    for n, (op, text) in enumerate(ops):
        scope = parse_scope(text)
        item = n % 3
        if op == "add":
            index.add(scope, item)
            entries.append((scope, item))
        elif op == "discard":
            index.discard(scope, item)
            if (scope, item) in entries:
                entries.remove((scope, item))
        else:
            assert bag(index.overlapping(scope)) == bag(
                (s, i) for s, i in entries if overlaps(s, scope)
            )

    assert len(index) == len(entries)
    assert bag(index) == bag(entries)
    assert bag(index.matching(path)) == bag(
        (s, i) for s, i in entries if s.matches(path)
    )
    split = [*index.pattern_matching(path)]
    split += [(parse_scope(path), i) for i in index.literal_items(path)]
    if path[:1] != "@":
        assert bag(split) == bag(index.matching(path))


def test_a_pattern_compiles_its_regex_on_first_match_only() -> None:
    """Parsing a glob compiles nothing; the first match compiles it, once."""
    scope_module._compile.cache_clear()
    scope = parse_scope("lazy/regex/*.py")

    assert scope_module._compile.cache_info().currsize == 0
    assert scope.matches("lazy/regex/a.py")
    assert not scope.matches("lazy/regex/a.pyc")
    assert scope_module._compile.cache_info().currsize == 1
    assert scope.overlaps(parse_scope("lazy/**/a.py"))
