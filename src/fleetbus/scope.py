"""The scope algebra: what a claim covers and what a fact is about.

A scope is either a path pattern, relative to the repository root, or a named
resource that is not a file (``@db-migrations``). Path patterns use globs
inside one segment (``*``, ``?``, ``[a-z]``, ``[!abc]``) and ``**`` as a whole
segment for any number of segments; a trailing ``/`` means a directory and
everything beneath it.

:func:`parse_scope` checks and normalises the text into a :class:`Scope`;
:func:`overlaps` decides exactly whether two scopes share a path, in time
polynomial in their sizes; :class:`ScopeIndex` finds the scopes of a large
collection that overlap a scope or match a path without scanning them all.
Nothing here does I/O.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from fleetbus.errors import BadScope

__all__ = [
    "MAX_GLOBSTARS",
    "MAX_RESOURCE_LEN",
    "MAX_SCOPE_LEN",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_LEN",
    "Scope",
    "ScopeIndex",
    "literal_scope",
    "overlaps",
    "parse_scope",
    "relative_path",
]

MAX_SCOPE_LEN = 1024
"""Most characters a scope's text may have."""

MAX_SEGMENTS = 64
"""Most path segments a scope may have."""

MAX_GLOBSTARS = 8
"""Most ``**`` segments a scope may have."""

MAX_SEGMENT_LEN = 255
"""Most characters one path segment may have."""

MAX_RESOURCE_LEN = 128
"""Most characters a resource name (after the ``@``) may have."""

GLOBSTAR = "**"

_GLOB_CHARS = frozenset("*?[")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RESOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]*")

# A character set is a sorted tuple of disjoint inclusive code point ranges.
# The universe of path characters is every code point but NUL and "/".
_CharSet = tuple[tuple[int, int], ...]
_SLASH = ord("/")
_UNIVERSE: _CharSet = ((1, _SLASH - 1), (_SLASH + 1, 0x10FFFF))

# A segment token is a character set (one character) or None (a ``*``).
_Token = _CharSet | None
_STAR_RE = "[^/\x00]*"
_NOTHING: _CharSet = ()
# An item of a pattern automaton: a path segment or a segment token.
_Item = TypeVar("_Item")


class _Malformed(Exception):
    """A rule broken inside one segment, turned into BadScope by the caller."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


class _ScopeFields:
    """The fields of a :class:`Scope`, assignable while one is being built."""

    __slots__ = (
        "_exact",
        "_regex",
        "_stepwise",
        "is_literal",
        "is_resource",
        "literal_prefix",
        "segments",
        "text",
    )

    text: str
    is_resource: bool
    segments: tuple[str, ...]
    literal_prefix: tuple[str, ...]
    is_literal: bool
    _exact: str
    _regex: re.Pattern[str] | None
    _stepwise: bool


class Scope(_ScopeFields):
    """A checked, normalised scope; build one with :func:`parse_scope`.

    Immutable. Equality, hashing and ordering go by the canonical ``text``
    alone, since it determines every other field.
    """

    __slots__ = ()

    def __new__(
        cls,
        text: str,
        *,
        is_resource: bool,
        segments: tuple[str, ...],
        literal_prefix: tuple[str, ...],
        is_literal: bool,
    ) -> Scope:
        pattern = not (is_resource or is_literal)
        return _build(
            text,
            is_resource,
            segments,
            literal_prefix,
            is_literal,
            text if is_resource else "/".join(segments),
            pattern and not _regex_is_safe(segments),
        )

    if not TYPE_CHECKING:
        # Hidden from type checkers, which would otherwise accept any name.

        def __getattr__(self, name: str) -> object:
            # Fields worked out on first use: a pattern's regex, which takes
            # far longer to compile than to parse the pattern, and the
            # segments of a literal from literal_scope.
            if name == "_regex":
                regex = None
                if not (self.is_resource or self.is_literal or self._stepwise):
                    regex = _compile(self.segments)
                _force_set(self, "_regex", regex)
                return regex
            if name not in ("segments", "literal_prefix"):
                raise AttributeError(name)
            segments = tuple(self.text.split("/"))
            _force_set(self, "segments", segments)
            _force_set(self, "literal_prefix", segments)
            return segments

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"a Scope is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"a Scope is immutable; cannot delete {name!r}")

    def __reduce__(self) -> tuple[Callable[[str], Scope], tuple[str]]:
        return parse_scope, (self.text,)

    def __repr__(self) -> str:
        return f"Scope({self.text!r})"

    def __str__(self) -> str:
        return self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Scope):
            return self.text == other.text
        return NotImplemented

    def __lt__(self, other: Scope) -> bool:
        return self.text < other.text

    def __le__(self, other: Scope) -> bool:
        return self.text <= other.text

    def __gt__(self, other: Scope) -> bool:
        return self.text > other.text

    def __ge__(self, other: Scope) -> bool:
        return self.text >= other.text

    def matches(self, path: str) -> bool:
        """Whether a canonical repo-relative path (or ``@name``) is in this scope."""
        regex = self._regex
        if regex is not None:
            return regex.fullmatch(path) is not None
        if self._stepwise:
            return _match_path(self.segments, path.split("/"))
        return path == self._exact

    def overlaps(self, other: Scope) -> bool:
        """Whether some path is in both scopes; see :func:`overlaps`."""
        return overlaps(self, other)

    def covers(self, other: Scope) -> bool:
        """Whether every path in ``other`` is surely in this scope.

        Conservative: True only for equal scopes, a literal ``other`` that this
        scope matches, or a literal directory form (``src/auth/``, ``**``) with
        ``other`` beneath it. False may mean "not known".
        """
        if self.text == other.text:
            return True
        if self.is_resource or other.is_resource:
            return False
        if other.is_literal:
            return self.matches(other._exact)
        head = self.segments[:-1]
        if self.segments[-1] == GLOBSTAR and self.literal_prefix == head:
            return other.literal_prefix[: len(head)] == head
        return False


# Retyping a finished _ScopeFields into a Scope costs one call, where setting
# eight fields past Scope.__setattr__ would cost eight much slower ones.
_force_set = object.__setattr__


def _build(
    text: str,
    is_resource: bool,
    segments: tuple[str, ...],
    literal_prefix: tuple[str, ...],
    is_literal: bool,
    exact: str,
    stepwise: bool,
) -> Scope:
    fields = _ScopeFields()
    fields.text = text
    fields.is_resource = is_resource
    fields.segments = segments
    fields.literal_prefix = literal_prefix
    fields.is_literal = is_literal
    fields._exact = exact
    fields._stepwise = stepwise
    _force_set(fields, "__class__", Scope)
    return cast(Scope, fields)


# One segment of a canonical literal path: not "." or "..", no separator,
# control character, backslash or glob character, and not too long.
_LITERAL_SEGMENT = (
    r"(?!\.\.?(?:/|\Z))[^/\x00-\x1f\x7f-\x9f*?\[\\]{1," + str(MAX_SEGMENT_LEN) + "}"
)
_CANONICAL_LITERAL = re.compile(
    rf"(?!@){_LITERAL_SEGMENT}(?:/{_LITERAL_SEGMENT}){{0,{MAX_SEGMENTS - 1}}}"
)


def literal_scope(text: str) -> Scope | None:
    """The scope of ``text`` if it is the canonical text of a literal path.

    A fast path for texts that are already canonical, such as those a broker
    sends: no parsing beyond a check and a split, and no cache. ``None`` means
    "not known to be": give the text to :func:`parse_scope`, which agrees with
    this function wherever this one returns a scope.
    """
    if len(text) > MAX_SCOPE_LEN or _CANONICAL_LITERAL.fullmatch(text) is None:
        return None
    # Built inline and without its segments, which Scope.__getattr__ splits
    # out on first use: this is the loop of loading a large snapshot.
    fields = _ScopeFields()
    fields.text = text
    fields.is_resource = False
    fields.is_literal = True
    fields._exact = text
    fields._regex = None
    fields._stepwise = False
    _force_set(fields, "__class__", Scope)
    return cast(Scope, fields)


def parse_scope(text: str) -> Scope:
    """Check and normalise the text of a scope.

    Raises :class:`~fleetbus.errors.BadScope` whose ``rule`` names the broken
    rule: ``empty``, ``too_long``, ``control_char``, ``resource``,
    ``backslash``, ``absolute``, ``escape``, ``segment_too_long``, ``bracket``,
    ``too_many_segments`` or ``too_many_globstars``.
    """
    return _parse_cached(text)


@lru_cache(maxsize=8192)
def _parse_cached(text: str) -> Scope:
    literal = literal_scope(text)
    if literal is not None:
        return literal
    if not text:
        raise BadScope("scope is empty", rule="empty", scope=text)
    if len(text) > MAX_SCOPE_LEN:
        raise BadScope(
            f"scope is {len(text)} characters long, more than {MAX_SCOPE_LEN}",
            rule="too_long",
            scope=text,
        )
    if _CONTROL.search(text):
        raise BadScope(
            "scope contains a control character", rule="control_char", scope=text
        )
    if text.startswith("@"):
        return _parse_resource(text)
    if "\\" in text:
        raise BadScope(
            "scope contains a backslash; paths use '/'", rule="backslash", scope=text
        )
    if text.startswith("/"):
        raise BadScope(
            "scope is an absolute path; scopes are relative to the repository root",
            rule="absolute",
            scope=text,
        )
    try:
        segments = _path_segments(text)
    except _Malformed as exc:
        raise BadScope(exc.message, rule=exc.rule, scope=text) from None

    return _path_scope(segments)


def _parse_resource(text: str) -> Scope:
    name = text[1:]
    if len(name) > MAX_RESOURCE_LEN or not _RESOURCE_NAME.fullmatch(name):
        raise BadScope(
            "a resource name starts with a letter or digit, has only letters, "
            f"digits and '._:/+=-', and at most {MAX_RESOURCE_LEN} characters",
            rule="resource",
            scope=text,
        )

    return Scope(
        text, is_resource=True, segments=(), literal_prefix=(), is_literal=False
    )


def _path_segments(text: str) -> tuple[str, ...]:
    segments: list[str] = []
    for raw in text.split("/"):
        if raw in ("", "."):
            continue
        if raw == "..":
            raise _Malformed("escape", "scope climbs out of the repository with '..'")
        if len(raw) > MAX_SEGMENT_LEN:
            raise _Malformed(
                "segment_too_long",
                f"a segment is {len(raw)} characters long, more than {MAX_SEGMENT_LEN}",
            )
        if _GLOB_CHARS.isdisjoint(raw):
            # A literal segment is its own canonical text; parsing it character
            # by character is what made loading a large snapshot slow.
            segments.append(raw)
        elif raw != GLOBSTAR:
            segments.append(_parse_segment(raw)[0])
        elif not segments or segments[-1] != GLOBSTAR:
            segments.append(GLOBSTAR)
    # A trailing "/" names the directory and all beneath it; nothing left at all
    # (".", "./") names the whole repository.
    if (text.endswith("/") or not segments) and segments[-1:] != [GLOBSTAR]:
        segments.append(GLOBSTAR)
    if len(segments) > MAX_SEGMENTS:
        raise _Malformed(
            "too_many_segments",
            f"scope has {len(segments)} segments, more than {MAX_SEGMENTS}",
        )
    globstars = segments.count(GLOBSTAR)
    if globstars > MAX_GLOBSTARS:
        raise _Malformed(
            "too_many_globstars",
            f"scope has {globstars} '**' segments, more than {MAX_GLOBSTARS}",
        )

    return tuple(segments)


def _path_scope(segments: tuple[str, ...]) -> Scope:
    prefix: list[str] = []
    for segment in segments:
        if segment == GLOBSTAR or not _GLOB_CHARS.isdisjoint(segment):
            break
        prefix.append(segment)
    literal = len(prefix) == len(segments)
    if len(segments) > 1 and segments[-1] == GLOBSTAR:
        text = "/".join(segments[:-1]) + "/"
    else:
        text = "/".join(segments)
    # "./" keeps a first segment such as "@x" from reading as a resource.
    if text.startswith("@"):
        text = "./" + text

    return Scope(
        text,
        is_resource=False,
        segments=segments,
        literal_prefix=tuple(prefix),
        is_literal=literal,
    )


@lru_cache(maxsize=16384)
def _parse_segment(raw: str) -> tuple[str, tuple[_Token, ...]]:
    """The canonical text and tokens of one segment (not ``**``)."""
    parts: list[str] = []
    tokens: list[_Token] = []
    i = 0
    while i < len(raw):
        char = raw[i]
        if char == "*":
            # Runs of "*" inside a segment mean one "*".
            if not tokens or tokens[-1] is not None:
                parts.append("*")
                tokens.append(None)
            i += 1
        elif char == "?":
            parts.append("?")
            tokens.append(_UNIVERSE)
            i += 1
        elif char == "[":
            i, text, charset = _parse_class(raw, i)
            parts.append(text)
            tokens.append(charset)
        else:
            parts.append(char)
            tokens.append(((ord(char), ord(char)),))
            i += 1

    return "".join(parts), tuple(tokens)


def _parse_class(raw: str, start: int) -> tuple[int, str, _CharSet]:
    """Parse the class opening at ``raw[start]``: (next index, text, set)."""
    i = start + 1
    negated = raw[i : i + 1] in ("!", "^")
    if negated:
        i += 1
    body_start = i
    ranges: list[tuple[int, int]] = []
    while True:
        if i >= len(raw):
            raise _Malformed(
                "bracket",
                f"character class {raw[start:]!r} is not closed by ']' (a ']' "
                "right after '[' or '[!' is a member, so '[]' is not a class)",
            )
        char = raw[i]
        if char == "]" and i > body_start:
            break
        if i + 2 < len(raw) and raw[i + 1] == "-" and raw[i + 2] != "]":
            low, high = ord(char), ord(raw[i + 2])
            if low > high:
                raise _Malformed(
                    "bracket",
                    f"range {raw[i : i + 3]!r} in a character class runs backwards",
                )
            ranges.append((low, high))
            i += 3
        else:
            ranges.append((ord(char), ord(char)))
            i += 1
    members = _intersect(_normalise(ranges), _UNIVERSE)
    charset = _complement(members) if negated else members
    if not charset:
        raise _Malformed("bracket", "character class matches no character")
    text = "[" + ("!" if negated else "") + raw[body_start:i] + "]"

    return i + 1, text, charset


def _normalise(ranges: list[tuple[int, int]]) -> _CharSet:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(high, merged[-1][1]))
        else:
            merged.append((low, high))

    return tuple(merged)


def _intersect(a: _CharSet, b: _CharSet) -> _CharSet:
    out: list[tuple[int, int]] = []
    i = j = 0
    while i < len(a) and j < len(b):
        low, high = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if low <= high:
            out.append((low, high))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1

    return tuple(out)


def _complement(charset: _CharSet) -> _CharSet:
    gaps: list[tuple[int, int]] = []
    start = 0
    for low, high in charset:
        if low > start:
            gaps.append((start, low - 1))
        start = high + 1
    if start <= 0x10FFFF:
        gaps.append((start, 0x10FFFF))

    return _intersect(tuple(gaps), _UNIVERSE)


def _charset_regex(charset: _CharSet) -> str:
    if len(charset) == 1 and charset[0][0] == charset[0][1]:
        return re.escape(chr(charset[0][0]))
    parts = [
        re.escape(chr(low))
        if low == high
        else f"{re.escape(chr(low))}-{re.escape(chr(high))}"
        for low, high in charset
    ]

    return "[" + "".join(parts) + "]"


def _segment_regex(segment: str) -> str:
    tokens = _parse_segment(segment)[1]
    if tokens == (None,):
        # Path segments are never empty, so a lone "*" needs one character.
        return "[^/\x00]+"

    return "".join(_STAR_RE if t is None else _charset_regex(t) for t in tokens)


def _regex_is_safe(segments: tuple[str, ...]) -> bool:
    """Whether a backtracking regex matches these segments in reasonable time.

    Each further ``*`` in a segment, or ``**`` before the last segment,
    multiplies the work a failing match can take; such patterns go to
    :func:`_match_path` instead.
    """
    inner_globstars = segments[:-1].count(GLOBSTAR)
    stars = (_parse_segment(s)[1].count(None) for s in segments if s != GLOBSTAR)
    return inner_globstars <= 1 and all(n <= 1 for n in stars)


def _match_path(segments: tuple[str, ...], names: list[str]) -> bool:
    """Match path segments against a pattern without exponential backtracking.

    The classic wildcard walk: on a mismatch, go back only to the latest ``**``
    and let it take one more segment. That is enough because every other
    pattern segment takes exactly one path segment.
    """
    i = k = 0
    star, mark = -1, 0
    while k < len(names):
        if i < len(segments) and segments[i] == GLOBSTAR:
            star, mark = i, k
            i += 1
        elif i < len(segments) and _match_segment(segments[i], names[k]):
            i += 1
            k += 1
        elif star >= 0:
            mark += 1
            i, k = star + 1, mark
        else:
            return False
    while i < len(segments) and segments[i] == GLOBSTAR:
        i += 1

    return i == len(segments)


def _match_segment(segment: str, name: str) -> bool:
    """The same walk within one segment, ``*`` against characters."""
    if not name:
        return False
    tokens = _parse_segment(segment)[1]
    i = k = 0
    star, mark = -1, 0
    while k < len(name):
        token = tokens[i] if i < len(tokens) else _NOTHING
        if token is None:
            star, mark = i, k
            i += 1
        elif _contains(token, ord(name[k])):
            i += 1
            k += 1
        elif star >= 0:
            mark += 1
            i, k = star + 1, mark
        else:
            return False
    while i < len(tokens) and tokens[i] is None:
        i += 1

    return i == len(tokens)


def _contains(charset: _CharSet, code: int) -> bool:
    return any(low <= code <= high for low, high in charset)


@lru_cache(maxsize=8192)
def _compile(segments: tuple[str, ...]) -> re.Pattern[str]:
    if segments == (GLOBSTAR,):
        return re.compile("[^/\x00]+(?:/[^/\x00]+)*")
    parts: list[str] = []
    after_segment = False
    for index, segment in enumerate(segments):
        if segment != GLOBSTAR:
            parts.append(("/" if after_segment else "") + _segment_regex(segment))
            after_segment = True
        elif index == len(segments) - 1:
            parts.append("(?:/[^/\x00]+)*")
        else:
            parts.append(("/" if after_segment else "") + "(?:[^/\x00]+/)*")
            after_segment = False

    return re.compile("".join(parts))


def overlaps(a: Scope, b: Scope) -> bool:
    """Whether some path (or resource) is in both scopes; exact.

    A resource overlaps only itself, never a path scope. For path patterns this
    runs a product automaton over segment positions, where ``**`` loops, and
    each segment pair is itself decided by a product automaton over glob
    tokens: polynomial in the sizes of both patterns.
    """
    if a.is_resource or b.is_resource:
        return a.text == b.text
    if a.is_literal:
        return b.matches(a._exact)
    if b.is_literal:
        return a.matches(b._exact)
    shared = min(len(a.literal_prefix), len(b.literal_prefix))
    if a.literal_prefix[:shared] != b.literal_prefix[:shared]:
        return False

    return _paths_overlap(a.segments, b.segments)


@lru_cache(maxsize=8192)
def _paths_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether some path matches both segment patterns.

    A ``**`` loops on any segment; two other segments step together when some
    segment matches both.
    """
    return _product_accepts(a, b, _is_globstar, _segment_steps)


def _is_globstar(segment: str) -> bool:
    return segment == GLOBSTAR


def _segment_steps(a: str, b: str) -> bool:
    return a == GLOBSTAR or b == GLOBSTAR or _segments_overlap(a, b)


@lru_cache(maxsize=16384)
def _segments_overlap(a: str, b: str) -> bool:
    """Whether some non-empty segment matches both glob segments.

    The same product construction as for paths, over glob tokens: a ``*`` loops
    on any character, other tokens step on their character set, and a step is
    possible when the two sets intersect.
    """
    if _GLOB_CHARS.isdisjoint(a) and _GLOB_CHARS.isdisjoint(b):
        return a == b
    ta, tb = _parse_segment(a)[1], _parse_segment(b)[1]

    return _product_accepts(ta, tb, _is_star_token, _tokens_step)


def _is_star_token(token: _Token) -> bool:
    return token is None


def _tokens_step(a: _Token, b: _Token) -> bool:
    a_set = _UNIVERSE if a is None else a
    b_set = _UNIVERSE if b is None else b
    return bool(_intersect(a_set, b_set))


def _product_accepts(
    a: Sequence[_Item],
    b: Sequence[_Item],
    loops: Callable[[_Item], bool],
    steps: Callable[[_Item, _Item], bool],
) -> bool:
    """Search the product of two pattern automata for an accepting state.

    A pattern is a sequence of items, each of which matches one unit (a
    segment, a character); an item for which ``loops`` holds matches any
    number of units. ``steps`` says whether some unit matches both items.
    A state is (position in a, position in b, some unit consumed); the last
    part keeps the empty input from counting as shared.
    """
    seen: set[tuple[int, int, bool]] = set()
    stack = [(0, 0, False)]
    while stack:
        state = stack.pop()
        if state in seen:
            continue
        seen.add(state)
        i, j, consumed = state
        if i == len(a) and j == len(b) and consumed:
            return True
        a_star = i < len(a) and loops(a[i])
        b_star = j < len(b) and loops(b[j])
        if a_star:
            stack.append((i + 1, j, consumed))
        if b_star:
            stack.append((i, j + 1, consumed))
        if i == len(a) or j == len(b):
            continue
        # Consume one unit on both sides; a looping item may stay where it is.
        if steps(a[i], b[j]):
            stack.append((i if a_star else i + 1, j if b_star else j + 1, True))

    return False


def relative_path(path: str, root: str) -> str:
    """The repo-relative path of ``path`` inside the worktree at ``root``.

    A pure mapping on strings (both are normalised with ``posixpath.normpath``);
    the root itself maps to ``"."``. An absolute path outside ``root`` raises
    :class:`~fleetbus.errors.BadScope` with rule ``outside_repo``; a relative
    path is returned normalised, or refused with rule ``escape`` if it climbs
    out with ``..``.
    """
    if not path:
        raise BadScope("path is empty", rule="empty", scope=path)
    normal = _normpath(path)
    if not posixpath.isabs(normal):
        if normal == ".." or normal.startswith("../"):
            raise BadScope(
                f"path {path!r} climbs out of the repository with '..'",
                rule="escape",
                scope=path,
            )
        return normal
    base = _normpath(root)
    if normal == base:
        return "."
    if base == "/":
        return normal.lstrip("/")
    if normal.startswith(base + "/"):
        return normal[len(base) + 1 :]
    raise BadScope(
        f"path {path!r} is outside the repository at {root!r}",
        rule="outside_repo",
        scope=path,
    )


def _normpath(path: str) -> str:
    normal = posixpath.normpath(path)
    # POSIX lets "//" at the start mean something else; a worktree never does.
    if normal.startswith("//"):
        return "/" + normal.lstrip("/")
    return normal


T = TypeVar("T")


class _Node(Generic[T]):
    """One node of the pattern trie: the patterns whose literal prefix ends here."""

    __slots__ = ("children", "patterns")

    def __init__(self) -> None:
        self.children: dict[str, _Node[T]] = {}
        self.patterns: dict[Scope, list[T]] = {}

    def is_empty(self) -> bool:
        return not (self.children or self.patterns)


class _Many(list[T]):
    """The items of a literal path held more than once, in a ScopeIndex."""

    __slots__ = ()


_ABSENT: object = object()


class _Dir:
    """One directory of the literal tree: the literal paths directly in it."""

    __slots__ = ("children", "names")

    def __init__(self) -> None:
        self.children: dict[str, _Dir] = {}
        self.names: set[str] = set()


class ScopeIndex(Generic[T]):
    """Scopes with attached items, indexed so a lookup does not scan every entry.

    An entry is a (scope, item) pair; adding the same pair twice holds it twice
    and :meth:`discard` removes one of them.

    Literal paths are kept in a dictionary keyed by the path, so finding the
    literal entries at a path costs the same with ten entries or a million.
    Patterns (globs, directories) sit in a trie on the segments of their
    literal prefix, and a path is walked down that trie only as far as it
    holds patterns. Finding the literal paths beneath a pattern needs a tree
    of them too: it is built on first need and kept from then on, or from the
    start with ``eager=True``; :meth:`build_tree` builds it ahead of need, a
    slice at a time.
    """

    def __init__(self, *, eager: bool = False) -> None:
        self._root: _Node[T] = _Node()
        self._resources: dict[str, list[T]] = {}
        self._scopes: dict[str, Scope] = {}
        # A path held once maps to its item itself, one held more often to a
        # _Many: one hop fewer on the way to the item of the common case.
        self._literals: dict[str, T | _Many[T]] = {}
        self._literal_scopes: dict[str, Scope] = {}
        self._tree: _Dir | None = _Dir() if eager else None
        # A tree being built by slices, and the literal scopes not in it yet.
        self._partial: _Dir | None = None
        self._unbuilt: list[Scope] = []
        self._len = 0

    def __len__(self) -> int:
        """The number of (scope, item) entries."""
        return self._len

    def add(self, scope: Scope, item: T) -> None:
        """Hold ``item`` under ``scope``."""
        self._len += 1
        if scope.is_literal:
            path = scope._exact
            held = self._literals.get(path, _ABSENT)
            if held is _ABSENT:
                self._literals[path] = item
            elif isinstance(held, _Many):
                held.append(item)
                return
            else:
                self._literals[path] = _Many((cast(T, held), item))
                return
            self._literal_scopes[path] = scope
            tree = self._tree if self._tree is not None else self._partial
            if tree is not None:
                _tree_add(tree, scope.segments)
            return
        if scope.is_resource:
            self._scopes[scope.text] = scope
            self._resources.setdefault(scope.text, []).append(item)
            return
        node = self._root
        for name in scope.literal_prefix:
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = _Node()
            node = child
        node.patterns.setdefault(scope, []).append(item)

    def discard(self, scope: Scope, item: T) -> None:
        """Drop one (scope, item) entry; nothing happens if there is none."""
        if scope.is_literal:
            self._discard_literal(scope, item)
        elif scope.is_resource:
            items = self._resources.get(scope.text)
            if items is not None and _remove(items, item):
                self._len -= 1
                if not items:
                    del self._resources[scope.text]
                    del self._scopes[scope.text]
        else:
            self._discard_pattern(scope, item)

    def _discard_literal(self, scope: Scope, item: T) -> None:
        path = scope._exact
        held = self._literals.get(path, _ABSENT)
        if isinstance(held, _Many):
            if not _remove(held, item):
                return
            self._len -= 1
            if len(held) == 1:
                self._literals[path] = held[0]
            return
        if held is _ABSENT or (held is not item and held != item):
            return
        self._len -= 1
        del self._literals[path]
        del self._literal_scopes[path]
        tree = self._tree if self._tree is not None else self._partial
        if tree is not None:
            _tree_discard(tree, scope.segments)

    def _discard_pattern(self, scope: Scope, item: T) -> None:
        path: list[tuple[_Node[T], str]] = []
        node = self._root
        for name in scope.literal_prefix:
            child = node.children.get(name)
            if child is None:
                return
            path.append((node, name))
            node = child
        items = node.patterns.get(scope)
        if items is None or not _remove(items, item):
            return
        if not items:
            del node.patterns[scope]
        self._len -= 1
        # Prune emptied nodes so that removed scopes leave no trail behind.
        while path and node.is_empty():
            parent, name = path.pop()
            del parent.children[name]
            node = parent

    def literal_items(self, path: str) -> Sequence[T]:
        """The items held under the literal scope of exactly ``path``.

        The sequence may be the index's own: read it, do not keep or change it.
        """
        held = self._literals.get(path, _ABSENT)
        if held is _ABSENT:
            return ()
        if isinstance(held, _Many):
            return held
        return (cast(T, held),)

    def pattern_matching(self, path: str) -> list[tuple[Scope, T]]:
        """The entries of pattern scopes (globs, directories) matching ``path``.

        Only the part of the trie that holds patterns is walked: nothing at
        all when no pattern's literal prefix starts the path.
        """
        node = self._root
        found: list[tuple[Scope, T]] = []
        if node.patterns:
            _match_at(node, path, found)
        if not node.children:
            return found
        for name in path.split("/"):
            child = node.children.get(name)
            if child is None:
                break
            node = child
            if node.patterns:
                _match_at(node, path, found)
        return found

    def overlapping(self, scope: Scope) -> Iterator[tuple[Scope, T]]:
        """Exactly the entries whose scope overlaps ``scope``."""
        if scope.is_resource:
            for item in self._resources.get(scope.text, ()):
                yield self._scopes[scope.text], item
            return
        if scope.is_literal:
            # A literal overlaps what matches its one path.
            yield from self.pattern_matching(scope._exact)
            yield from self._literal_entries(scope._exact)
            return
        # Two path scopes can share a path only if one literal prefix starts
        # the other: the candidates lie on the way down or beneath.
        node = self._root
        for name in scope.literal_prefix:
            yield from _overlapping(node.patterns.items(), scope)
            child = node.children.get(name)
            if child is None:
                break
            node = child
        else:
            yield from _overlapping(_subtree(node), scope)
        for path in _tree_beneath(self._literal_tree(), scope.literal_prefix):
            if scope.matches(path):
                yield from self._literal_entries(path)

    def matching(self, path: str) -> Iterator[tuple[Scope, T]]:
        """Exactly the entries whose scope matches ``path``.

        A path spelled ``@name`` also matches the resource of that name.
        """
        if path[:1] == "@":
            for item in self._resources.get(path, ()):
                yield self._scopes[path], item
        yield from self.pattern_matching(path)
        yield from self._literal_entries(path)

    def __iter__(self) -> Iterator[tuple[Scope, T]]:
        """Every entry: resources, then literal paths, then patterns."""
        for text, items in self._resources.items():
            for item in items:
                yield self._scopes[text], item
        for path in self._literals:
            yield from self._literal_entries(path)
        for scope, items in _subtree(self._root):
            for item in items:
                yield scope, item

    def _literal_entries(self, path: str) -> Iterator[tuple[Scope, T]]:
        items = self.literal_items(path)
        if items:
            scope = self._literal_scopes[path]
            for item in items:
                yield scope, item

    def build_tree(self, budget: int | None = None) -> bool:
        """Build the tree of literal paths ahead of the first pattern query
        that needs it, at most ``budget`` paths this call; whether it is built.

        Between slices the index stays usable: paths added or dropped meanwhile
        go into the part already built, and a query that needs the tree
        finishes it first.
        """
        if self._tree is not None:
            return True
        partial = self._partial
        if partial is None:
            partial = self._partial = _Dir()
            self._unbuilt = list(self._literal_scopes.values())
        unbuilt = self._unbuilt
        current = self._literal_scopes
        for _ in range(len(unbuilt) if budget is None else budget):
            if not unbuilt:
                break
            scope = unbuilt.pop()
            # Dropped since the slicing began, or added again (and then
            # already put in the tree): either way nothing to do.
            if current.get(scope._exact) is scope:
                _tree_add(partial, scope.segments)
        if unbuilt:
            return False
        self._tree, self._partial = partial, None
        return True

    def _literal_tree(self) -> _Dir:
        if self._tree is None:
            self.build_tree()
        assert self._tree is not None
        return self._tree


def _remove(items: list[T], item: T) -> bool:
    try:
        items.remove(item)
    except ValueError:
        return False
    return True


def _match_at(node: _Node[T], path: str, found: list[tuple[Scope, T]]) -> None:
    for scope, items in node.patterns.items():
        if scope.matches(path):
            found.extend((scope, item) for item in items)


def _subtree(node: _Node[T]) -> Iterator[tuple[Scope, list[T]]]:
    stack = [node]
    while stack:
        current = stack.pop()
        yield from current.patterns.items()
        stack.extend(current.children.values())


def _overlapping(
    entries: Iterable[tuple[Scope, list[T]]], scope: Scope
) -> Iterator[tuple[Scope, T]]:
    for held, items in entries:
        if overlaps(held, scope):
            for item in items:
                yield held, item


def _tree_add(tree: _Dir, segments: tuple[str, ...]) -> None:
    node = tree
    for name in segments[:-1]:
        child = node.children.get(name)
        if child is None:
            child = node.children[name] = _Dir()
        node = child
    node.names.add(segments[-1])


def _tree_discard(tree: _Dir, segments: tuple[str, ...]) -> None:
    path: list[tuple[_Dir, str]] = []
    node = tree
    for name in segments[:-1]:
        child = node.children.get(name)
        if child is None:
            return
        path.append((node, name))
        node = child
    node.names.discard(segments[-1])
    while path and not (node.children or node.names):
        parent, name = path.pop()
        del parent.children[name]
        node = parent


def _tree_beneath(tree: _Dir, prefix: tuple[str, ...]) -> Iterator[str]:
    """The literal paths whose segments start with ``prefix``."""
    node = tree
    for name in prefix[:-1]:
        child = node.children.get(name)
        if child is None:
            return
        node = child
    if prefix:
        last = prefix[-1]
        if last in node.names:
            yield "/".join(prefix)
        child = node.children.get(last)
        if child is None:
            return
        node = child
    stack = [("/".join(prefix) + "/" if prefix else "", node)]
    while stack:
        base, current = stack.pop()
        for name in current.names:
            yield base + name
        for name, child in current.children.items():
            stack.append((base + name + "/", child))
