"""Tests of ScopeIndex: lookups by overlap and by path equal a linear scan."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetbus.scope import Scope, ScopeIndex, overlaps, parse_scope

TOKENS = ["a", "b", "*", "?", "[ab]", "[!a]"]

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
resource_text = st.sampled_from(["@a", "@b", "@db"])
scope_text = st.one_of(pattern_text, pattern_text, resource_text)
path_text = st.one_of(
    st.lists(st.sampled_from(["a", "b", "ab", "ba", "bb"]), min_size=1, max_size=4).map(
        "/".join
    ),
    resource_text,
)


def build(texts: list[str]) -> tuple[ScopeIndex[int], list[tuple[Scope, int]]]:
    """An index and the plain list of the same entries, item = position."""
    index: ScopeIndex[int] = ScopeIndex()
    entries = [(parse_scope(text), n) for n, text in enumerate(texts)]
    for scope, item in entries:
        index.add(scope, item)
    return index, entries


def bag(entries: Iterable[tuple[Scope, int]]) -> Counter[tuple[str, int]]:
    """Entries as a multiset of (text, item), independent of order."""
    return Counter((scope.text, item) for scope, item in entries)


def test_add_discard_and_len() -> None:
    """len counts entries; discard removes one and ignores absent ones."""
    index: ScopeIndex[str] = ScopeIndex()
    src, db = parse_scope("src/"), parse_scope("@db")
    index.add(src, "x")
    index.add(src, "x")
    index.add(db, "y")

    index.discard(src, "x")
    index.discard(src, "absent")
    index.discard(parse_scope("other/a.py"), "x")
    index.discard(parse_scope("@nope"), "x")

    assert len(index) == 2
    assert bag(index.matching("src/a.py")) == Counter({("src/", "x"): 1})
    assert bag(index.matching("@db")) == Counter({("@db", "y"): 1})


def test_discarding_everything_leaves_an_empty_index() -> None:
    """After every entry is discarded, nothing is found and nothing is left."""
    texts = ["src/a.py", "src/", "src/auth/x/*.py", "**", "@db", "src/a.py"]
    index, entries = build(texts)

    for scope, item in entries:
        index.discard(scope, item)

    assert len(index) == 0
    assert list(index) == []
    assert list(index.overlapping(parse_scope("**"))) == []
    assert list(index.matching("src/a.py")) == []


def test_lookups_on_a_small_table() -> None:
    """Ancestors, descendants and resources are found; unrelated scopes are not."""
    index, _ = build(
        ["src/", "src/auth/login.py", "src/*.md", "docs/", "**/*.py", "@db", "@port"]
    )

    found = {s.text for s, _ in index.overlapping(parse_scope("src/auth/"))}
    at_path = {s.text for s, _ in index.matching("src/auth/login.py")}
    resource = {s.text for s, _ in index.overlapping(parse_scope("@db"))}

    assert found == {"src/", "src/auth/login.py", "**/*.py"}
    assert at_path == {"src/", "src/auth/login.py", "**/*.py"}
    assert resource == {"@db"}


@settings(max_examples=200, deadline=None)
@given(st.lists(scope_text, max_size=30), scope_text, st.data())
def test_overlapping_equals_a_linear_scan(
    texts: list[str], query: str, data: st.DataObject
) -> None:
    """overlapping(q) yields exactly the entries a scan with overlaps() finds."""
    index, entries = build(texts)
    gone = data.draw(st.sets(st.integers(0, max(len(texts) - 1, 0))))
    for scope, item in entries:
        if item in gone:
            index.discard(scope, item)
    kept = [(s, n) for s, n in entries if n not in gone]
    q = parse_scope(query)

    assert bag(index.overlapping(q)) == bag((s, n) for s, n in kept if overlaps(s, q))
    assert len(index) == len(kept)


@settings(max_examples=200, deadline=None)
@given(st.lists(scope_text, max_size=30), path_text)
def test_matching_equals_a_linear_scan(texts: list[str], path: str) -> None:
    """matching(p) yields exactly the entries a scan with matches() finds."""
    index, entries = build(texts)

    assert bag(index.matching(path)) == bag(
        (s, n) for s, n in entries if s.matches(path)
    )


@settings(max_examples=100, deadline=None)
@given(st.lists(scope_text, max_size=30))
def test_iteration_yields_every_entry(texts: list[str]) -> None:
    """Iterating the index gives back every entry added."""
    index, entries = build(texts)

    assert bag(index) == bag(entries)


literal_text = st.lists(
    st.sampled_from(["a", "b", "ab", "ba"]), min_size=1, max_size=4
).map("/".join)
step = st.one_of(
    st.tuples(st.just("slice"), st.integers(0, 3)),
    st.tuples(st.just("add"), literal_text),
    st.tuples(st.just("discard"), st.integers(0, 40)),
    st.tuples(st.just("query"), pattern_text),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(literal_text, max_size=20), st.lists(step, max_size=25))
def test_tree_built_in_slices_between_changes_answers_like_a_scan(
    texts: list[str], steps: list[tuple[str, object]]
) -> None:
    """Slices of the literal tree, interleaved with adds, drops and pattern
    queries, leave every query equal to a scan of the entries held then."""
    index, entries = build(texts)
    held = list(entries)
    for kind, arg in steps:
        if kind == "slice":
            assert isinstance(arg, int)
            index.build_tree(arg)
        elif kind == "add":
            entry = (parse_scope(str(arg)), len(entries))
            entries.append(entry)
            held.append(entry)
            index.add(*entry)
        elif kind == "discard" and held:
            assert isinstance(arg, int)
            entry = held.pop(arg % len(held))
            index.discard(*entry)
        elif kind == "query":
            q = parse_scope(str(arg))
            assert bag(index.overlapping(q)) == bag(
                (s, n) for s, n in held if overlaps(s, q)
            )
    assert index.build_tree(None)
    for text in ("**", "a/", "b/**/a"):
        q = parse_scope(text)
        assert bag(index.overlapping(q)) == bag(
            (s, n) for s, n in held if overlaps(s, q)
        )
