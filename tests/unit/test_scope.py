"""Tests of the scope algebra: parsing, matching, overlap and containment."""

from __future__ import annotations

import fnmatch
import itertools
from functools import lru_cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fleetbus.errors import BadScope
from fleetbus.scope import (
    MAX_SCOPE_LEN,
    Scope,
    overlaps,
    parse_scope,
    relative_path,
)

# --- parsing and normalisation ----------------------------------------------

CANONICAL = [
    ("src/a.py", "src/a.py"),
    ("./src/a.py", "src/a.py"),
    ("src/./a.py", "src/a.py"),
    ("src//a.py", "src/a.py"),
    ("src/auth/", "src/auth/"),
    ("src/auth/**", "src/auth/"),
    ("src/auth//", "src/auth/"),
    ("src/auth/**/", "src/auth/"),
    ("src/**/**/a.py", "src/**/a.py"),
    ("**/**", "**"),
    ("**", "**"),
    ("**/", "**"),
    (".", "**"),
    ("./", "**"),
    ("./.", "**"),
    ("a**b", "a*b"),
    ("a/***", "a/*"),
    ("[^ab]", "[!ab]"),
    ("[]a]", "[]a]"),
    ("[!]a]", "[!]a]"),
    ("[a-]", "[a-]"),
    ("x]", "x]"),
    ("src/*/", "src/*/"),
    ("./@x", "./@x"),
    ("@db-migrations", "@db-migrations"),
    ("@port-8080", "@port-8080"),
    ("@a.b:c/d+e=f", "@a.b:c/d+e=f"),
]


@pytest.mark.parametrize(("text", "canonical"), CANONICAL)
def test_parse_normalises_to_canonical_text(text: str, canonical: str) -> None:
    """Parsing gives the canonical text, and the canonical text parses to itself."""
    scope = parse_scope(text)

    assert scope.text == canonical
    assert str(scope) == canonical
    assert parse_scope(scope.text) == scope


FIELDS = [
    ("src/a.py", False, ("src", "a.py"), ("src", "a.py"), True),
    ("src/auth/", False, ("src", "auth", "**"), ("src", "auth"), False),
    ("src/*.py", False, ("src", "*.py"), ("src",), False),
    ("src/**/x/*.py", False, ("src", "**", "x", "*.py"), ("src",), False),
    ("a/b?/c", False, ("a", "b?", "c"), ("a",), False),
    ("a/[bc]/d", False, ("a", "[bc]", "d"), ("a",), False),
    ("**", False, ("**",), (), False),
    ("@db", True, (), (), False),
]


@pytest.mark.parametrize(
    ("text", "is_resource", "segments", "prefix", "is_literal"), FIELDS
)
def test_parse_fills_the_derived_fields(
    text: str,
    is_resource: bool,
    segments: tuple[str, ...],
    prefix: tuple[str, ...],
    is_literal: bool,
) -> None:
    """Segments, literal prefix and the literal/resource flags are as documented."""
    scope = parse_scope(text)

    assert scope.is_resource is is_resource
    assert scope.segments == segments
    assert scope.literal_prefix == prefix
    assert scope.is_literal is is_literal


REFUSALS = [
    ("", "empty"),
    ("/src/a.py", "absolute"),
    ("/", "absolute"),
    ("..", "escape"),
    ("src/../../x", "escape"),
    ("a/..", "escape"),
    ("a\x00b", "control_char"),
    ("a\nb", "control_char"),
    ("a\x7fb", "control_char"),
    ("a\tb", "control_char"),
    ("src\\a.py", "backslash"),
    ("[ab", "bracket"),
    ("a[", "bracket"),
    ("[]", "bracket"),
    ("[!]", "bracket"),
    ("[z-a]", "bracket"),
    ("a/[b/c]", "bracket"),
    ("@", "resource"),
    ("@-x", "resource"),
    ("@a b", "resource"),
    ("@a*", "resource"),
    ("@" + "x" * 129, "resource"),
    ("x" * (MAX_SCOPE_LEN + 1), "too_long"),
    ("/".join(["a"] * 65), "too_many_segments"),
    ("/".join(["**", "a"] * 9), "too_many_globstars"),
    ("x" * 256, "segment_too_long"),
]


@pytest.mark.parametrize(("text", "rule"), REFUSALS)
def test_parse_refuses_with_the_broken_rule(text: str, rule: str) -> None:
    """Each refusal is a BadScope naming its rule and the scope text."""
    with pytest.raises(BadScope) as caught:
        parse_scope(text)

    assert caught.value.details["rule"] == rule
    assert caught.value.details["scope"] == text
    assert caught.value.message


def test_parse_accepts_scopes_at_the_limits() -> None:
    """Exactly at each limit a scope is still accepted."""
    parse_scope("x" * 255)
    parse_scope("/".join(["a"] * 64))
    parse_scope("/".join(["**", "a"] * 8))
    parse_scope("@" + "x" * 128)
    parse_scope("/".join(["x" * 204] * 5))


def test_scopes_are_hashable_and_ordered_by_text() -> None:
    """Equal text means equal and same hash; sorting goes by text."""
    scopes = [parse_scope(t) for t in ["b", "a/", "@z", "a/**"]]

    assert len(set(scopes)) == 3
    assert [s.text for s in sorted(set(scopes))] == ["@z", "a/", "b"]
    assert isinstance(scopes[0], Scope)


# --- matching ---------------------------------------------------------------

MATCHES = [
    ("src/a.py", "src/a.py", True),
    ("src/a.py", "src/a.pyc", False),
    ("src/a.py", "Src/a.py", False),
    ("src/*.py", "src/a.py", True),
    ("src/*.py", "src/.py", True),
    ("src/*.py", "src/sub/a.py", False),
    ("src/*", "src", False),
    ("src/?.py", "src/ab.py", False),
    ("src/[ab].py", "src/b.py", True),
    ("src/[!ab].py", "src/b.py", False),
    ("src/[!ab].py", "src/c.py", True),
    ("src/[^ab].py", "src/c.py", True),
    ("src/[a-c].py", "src/c.py", True),
    ("src/[a-c].py", "src/d.py", False),
    ("[]]", "]", True),
    ("[!]]", "]", False),
    ("[a-]", "-", True),
    ("src/auth/", "src/auth", True),
    ("src/auth/", "src/auth/x/y.py", True),
    ("src/auth/", "src/authx", False),
    ("src/auth/", "src", False),
    ("**", "a", True),
    ("**", "a/b/c", True),
    ("**/x.py", "x.py", True),
    ("**/x.py", "a/b/x.py", True),
    ("**/x.py", "a/bx.py", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("a/**/b", "a/x/y/bb", False),
    ("a**b", "axxb", True),
    ("a**b", "ax/xb", False),
    ("*", "a", True),
    ("*", "a/b", False),
    ("@db", "@db", True),
    ("@db", "db", False),
    ("./@x", "@x", True),
]


@pytest.mark.parametrize(("pattern", "path", "expected"), MATCHES)
def test_matches_table(pattern: str, path: str, expected: bool) -> None:
    """Each pattern matches exactly the paths its glob rules say."""
    assert parse_scope(pattern).matches(path) is expected


# --- overlap ----------------------------------------------------------------

OVERLAPS = [
    ("src/*.py", "src/a*", True),
    ("docs/*.md", "docs/sub/x.md", False),
    ("src/", "src/x/y.py", True),
    ("src/", "src", True),
    ("src/", "srcx/a", False),
    ("src/a.py", "src/a.py", True),
    ("src/a.py", "src/b.py", False),
    ("@db", "@db", True),
    ("@db", "@port-8080", False),
    ("@db", "**", False),
    ("**", "./@db", True),
    ("[abc]", "[cde]", True),
    ("[ab]", "[cd]", False),
    ("[a-f]", "[e-z]", True),
    ("[a-d]", "[e-z]", False),
    ("[!a]", "a", False),
    ("[!a]", "[!b]", True),
    ("[!ab]", "[ab]", False),
    ("[!a]", "[ab]", True),
    ("?", "[!x]", True),
    ("**/x", "x", True),
    ("**/x", "a/**", True),
    ("a/**", "**/b", True),
    ("a/**/b", "a/c", False),
    ("a/**/b", "**/c/**", True),
    ("a/**/b", "*/b", True),
    ("a/*/b", "a/b", False),
    ("a/**", "b/**", False),
    ("*.py", "*.md", False),
    ("*.py", "a.*", True),
    ("*a", "b*", True),
    ("a*", "?", True),
    ("??", "*a*b*", True),
    ("?", "*a*b*", False),
    ("*", "**", True),
    ("*/*", "*", False),
    ("x/*", "x/", True),
]


@pytest.mark.parametrize(("a", "b", "expected"), OVERLAPS)
def test_overlaps_table(a: str, b: str, expected: bool) -> None:
    """Overlap is true exactly when some path matches both, in both orders."""
    sa, sb = parse_scope(a), parse_scope(b)

    assert overlaps(sa, sb) is expected
    assert sb.overlaps(sa) is expected


def test_pathological_patterns_complete() -> None:
    """Globstar chains and star-heavy segments finish (polynomial, not exponential)."""
    chain = "/".join(["**", "a"] * 8)
    stars_b = "*a*a*a*a*a*a*a*a*a*a*a*a*b"
    stars_c = "*a*a*a*a*a*a*a*a*a*a*a*c"
    deep = "/".join([stars_b] * 8)

    assert overlaps(parse_scope(chain), parse_scope(chain + "/a")) is True
    assert overlaps(parse_scope(chain), parse_scope(chain + "/x")) is False
    assert overlaps(parse_scope(stars_b), parse_scope(stars_c)) is False
    assert overlaps(parse_scope(deep), parse_scope("/".join([stars_c] * 8))) is False
    assert overlaps(parse_scope("**/" + deep), parse_scope(chain)) is False
    assert parse_scope(chain).matches("a/" * 200 + "b") is False
    assert parse_scope(chain).matches("a/" * 200 + "a") is True
    assert parse_scope(stars_b).matches("a" * 250) is False
    assert parse_scope(deep + "/**").matches("/".join(["a" * 200] * 60)) is False


# --- containment ------------------------------------------------------------

COVERS = [
    ("src/", "src/a.py", True),
    ("src/", "src/**/*.py", True),
    ("src/", "src/auth/", True),
    ("src/", "src", True),
    ("src/", "srcx/a.py", False),
    ("**", "a/b/*.py", True),
    ("**", "@db", False),
    ("src/*.py", "src/a.py", True),
    ("src/*.py", "src/a.md", False),
    ("src/a.py", "src/*.py", False),
    ("@db", "@db", True),
    ("src/auth/x", "src/auth/", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), COVERS)
def test_covers_table(a: str, b: str, expected: bool) -> None:
    """Covers holds for equal scopes, matched literals and dir forms with b below."""
    assert parse_scope(a).covers(parse_scope(b)) is expected


# --- relative paths ---------------------------------------------------------

RELATIVE = [
    ("/repo/src/a.py", "/repo", "src/a.py"),
    ("/repo/src/../a.py", "/repo/", "a.py"),
    ("/repo", "/repo", "."),
    ("/repo/", "/repo", "."),
    ("//repo//src", "/repo", "src"),
    ("/a/b", "/", "a/b"),
    ("src/./a.py", "/repo", "src/a.py"),
    ("src/../a.py", "/repo", "a.py"),
]


@pytest.mark.parametrize(("path", "root", "expected"), RELATIVE)
def test_relative_path_maps_through_the_root(
    path: str, root: str, expected: str
) -> None:
    """Paths inside the root map to normalised repo-relative paths."""
    assert relative_path(path, root) == expected


@pytest.mark.parametrize(
    ("path", "root", "rule"),
    [
        ("/elsewhere/a.py", "/repo", "outside_repo"),
        ("/repository/a.py", "/repo", "outside_repo"),
        ("/repo/../a.py", "/repo", "outside_repo"),
        ("../a.py", "/repo", "escape"),
        ("a/../../b", "/repo", "escape"),
        ("", "/repo", "empty"),
    ],
)
def test_relative_path_refuses_paths_outside(path: str, root: str, rule: str) -> None:
    """A path outside the root, or climbing out of it, is a BadScope with its rule."""
    with pytest.raises(BadScope) as caught:
        relative_path(path, root)

    assert caught.value.details["rule"] == rule


# --- properties against brute force -----------------------------------------

CHARS = "ab."
# Every path of up to 3 segments of up to 3 characters over CHARS.
NAMES = ["".join(p) for n in range(1, 4) for p in itertools.product(CHARS, repeat=n)]
PATHS = ["/".join(p) for n in range(1, 4) for p in itertools.product(NAMES, repeat=n)]

# Negated classes exclude one character, so any two of these sets that meet
# anywhere also meet inside CHARS.
TOKENS = ["a", "b", ".", "?", "*", "[ab]", "[!a]", "[!.]", "[a-b]", "[.b]"]

segment_text = (
    st.lists(st.sampled_from(TOKENS), min_size=1, max_size=3)
    .map("".join)
    .filter(lambda segment: segment != "..")
)
pattern_text = st.builds(
    lambda segments, slash: "/".join(segments) + slash,
    st.lists(st.one_of(segment_text, st.just("**")), min_size=1, max_size=3),
    st.sampled_from(["", "", "/"]),
)
# "." and ".." name no file; a literal scope cannot spell them.
FILE_NAMES = [name for name in NAMES if name not in (".", "..")]
literal_text = st.lists(st.sampled_from(FILE_NAMES), min_size=1, max_size=3).map(
    "/".join
)


@lru_cache(maxsize=4096)
def enumerate_matches(text: str) -> frozenset[str]:
    """The paths of the small universe that a scope matches."""
    scope = parse_scope(text)
    return frozenset(p for p in PATHS if scope.matches(p))


def reference_matches(pattern: tuple[str, ...], path: tuple[str, ...]) -> bool:
    """An independent matcher: fnmatch per segment, recursion for ``**``."""
    if not pattern:
        return not path
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(reference_matches(rest, path[k:]) for k in range(len(path) + 1))
    return (
        bool(path)
        and fnmatch.fnmatchcase(path[0], head)
        and reference_matches(rest, path[1:])
    )


def _tokens(segment: str) -> int:
    """How many characters a segment needs at least: its non-star tokens."""
    return sum(1 for token in _split_tokens(segment) if token != "*")


def _split_tokens(segment: str) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(segment):
        end = segment.index("]", i + 2) + 1 if segment[i] == "[" else i + 1
        out.append(segment[i:end])
        i = end
    return out


def witness_fits(a: Scope, b: Scope) -> bool:
    """Whether a shared path, if any, must be short enough to be in PATHS.

    A shortest shared path has at most as many segments as both patterns have
    non-``**`` segments, and each segment at most as many characters as the two
    glob segments it meets have non-``*`` tokens.
    """
    plain_a = [s for s in a.segments if s != "**"]
    plain_b = [s for s in b.segments if s != "**"]
    if len(plain_a) + len(plain_b) > 3:
        return False
    needs = [_tokens(x) + _tokens(y) for x in plain_a for y in plain_b]
    needs += [_tokens(x) for x in plain_a + plain_b]
    return all(n <= 3 for n in needs)


@settings(max_examples=250, deadline=None)
@given(pattern_text, pattern_text)
def test_overlaps_agrees_with_brute_force(a: str, b: str) -> None:
    """A shared enumerated path means overlap; overlap of small patterns has one."""
    sa, sb = parse_scope(a), parse_scope(b)
    shared = bool(enumerate_matches(sa.text) & enumerate_matches(sb.text))
    result = overlaps(sa, sb)

    if shared:
        assert result
    if witness_fits(sa, sb):
        assert result == shared


@settings(max_examples=300, deadline=None)
@given(pattern_text, pattern_text)
def test_overlaps_is_symmetric(a: str, b: str) -> None:
    """overlaps(a, b) == overlaps(b, a)."""
    sa, sb = parse_scope(a), parse_scope(b)

    assert overlaps(sa, sb) == overlaps(sb, sa)


@settings(max_examples=300, deadline=None)
@given(pattern_text, literal_text)
def test_matches_agrees_with_overlap_of_a_literal(pattern: str, path: str) -> None:
    """For a literal path p, matches(p) is overlaps with parse_scope(p)."""
    scope, literal = parse_scope(pattern), parse_scope(path)

    assert scope.matches(path) == overlaps(scope, literal)
    assert scope.matches(path) == overlaps(literal, scope)


@settings(max_examples=100, deadline=None)
@given(pattern_text)
def test_matches_agrees_with_a_reference_matcher(pattern: str) -> None:
    """The compiled matcher agrees with fnmatch-per-segment on the universe."""
    scope = parse_scope(pattern)
    for path in PATHS[::7]:
        expected = reference_matches(scope.segments, tuple(path.split("/")))
        assert scope.matches(path) == expected, path


beneath = st.builds(
    lambda prefix, rest: (prefix + "/", prefix + "/" + rest),
    literal_text,
    st.one_of(pattern_text, literal_text),
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.tuples(
            st.one_of(pattern_text, literal_text, literal_text.map(lambda t: t + "/")),
            st.one_of(pattern_text, literal_text),
        ),
        beneath,
    )
)
def test_covers_implies_containment(pair: tuple[str, str]) -> None:
    """If a covers b, every enumerated path of b matches a."""
    sa, sb = parse_scope(pair[0]), parse_scope(pair[1])

    if sa.covers(sb):
        assert enumerate_matches(sb.text) <= enumerate_matches(sa.text)


@settings(max_examples=100, deadline=None)
@given(beneath)
def test_directory_covers_what_lies_beneath(pair: tuple[str, str]) -> None:
    """A literal directory form covers any scope written beneath it."""
    assert parse_scope(pair[0]).covers(parse_scope(pair[1]))
