"""A virtual host's routes flattened into one lookup program, built at compile time.

This module owns the translation of a VirtualHost's ordered routes and their match
entries into a *plan*: one flat tuple that ``match.match_route`` walks. It leaves the
meaning of each condition to ``table.StringMatcher`` and ``match.py``; a plan only
rearranges what the routes already say, so matching a plan gives the same route as
walking ``VirtualHost.routes`` (the tests check this against a plain reference).

Why a flat tuple: with thousands of virtual hosts almost every lookup lands on a
host whose objects are not in the CPU caches. Walking the routes reads, per route,
the Route, its ``matches`` tuple, the RouteMatch and its StringMatcher, each a
separate allocation somewhere else in memory, so the lookup's cost grew with the
size of the table through cache and TLB misses alone. The plan keeps the
conditions of every route of a host in one contiguous tuple of small integers
(shared, always cached) and the strings to compare; a Route object is only read
once it has matched. Strings are interned, so a header name or a value that many
hosts share is one object that stays cached.

Layout, entry after entry, one entry per match entry of each route in order::

    next, route, op, args..., op, args...

``next`` is the index of the following entry, ``route`` the Route to return when
every condition of the entry holds (an entry without conditions always holds).
The ops and their arguments are the ``OP_*`` constants below.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .table import Route, RouteMatch, StringMatcher

__all__ = [
    "OP_HEADER_EXACT",
    "OP_HEADER_MATCH",
    "OP_HEADER_PRESENT",
    "OP_METHOD_EXACT",
    "OP_METHOD_MATCH",
    "OP_QUERY_EXACT",
    "OP_QUERY_MATCH",
    "OP_QUERY_PRESENT",
    "OP_REST",
    "OP_URI_EXACT",
    "OP_URI_MATCH",
    "OP_URI_PREFIX",
    "OP_URI_REGEX",
    "OP_URI_SEGMENTS",
    "compile_plan",
    "regex_literal_prefix",
]

# Numbered in the order ``match_route`` tests them: the common ones first.
OP_URI_PREFIX = 0  # len(value), value: path.startswith(value)
OP_URI_EXACT = 1  # len(value), value: path == value
OP_URI_REGEX = 2  # literal prefix, pattern: path.startswith(prefix) and fullmatch
OP_HEADER_EXACT = 3  # name, value
OP_QUERY_EXACT = 4  # name, value (first value of the parameter, as received)
OP_METHOD_EXACT = 5  # value
OP_URI_SEGMENTS = 6  # value: a Gateway API PathPrefix, whole segments
OP_HEADER_PRESENT = 7  # name
OP_QUERY_PRESENT = 8  # name
OP_URI_MATCH = 9  # StringMatcher (ignore-case exact/prefix)
OP_METHOD_MATCH = 10  # StringMatcher
OP_HEADER_MATCH = 11  # name, StringMatcher
OP_QUERY_MATCH = 12  # name, StringMatcher
OP_REST = 13  # RouteMatch holding only port, scheme, authority, withoutHeaders, claims

# Characters that end the literal start of a regex. ``|`` is handled apart: any
# alternation may make the literal start optional, so a pattern with one gets none.
_REGEX_SPECIAL = frozenset("\\.^$*+?{}[]()|")
_QUANTIFIERS = frozenset("*+?{")
# A plain int: testing the flags of many patterns with the enum costs more.
_NO_PREFIX_FLAGS = int(re.IGNORECASE | re.VERBOSE)


def regex_literal_prefix(pattern: re.Pattern[str]) -> str:
    """The text every full match of ``pattern`` starts with ("" when unsure).

    ``/re/[0-9]+/item`` gives ``/re/``. The scan stops at the first character that
    is not a plain literal, drops the last literal when a quantifier follows it
    (``/ab*`` gives ``/a``), skips a leading ``^``, and gives up on alternation,
    case-insensitive and verbose patterns. A shorter prefix is always safe: it only
    means the regex runs more often.
    """
    source = pattern.pattern
    if not isinstance(source, str) or "|" in source:
        return ""
    if pattern.flags & _NO_PREFIX_FLAGS:
        return ""
    # A leading "^" always holds where a full match starts.
    start = end = 1 if source.startswith("^") else 0
    while end < len(source) and source[end] not in _REGEX_SPECIAL:
        end += 1
    if end < len(source) and source[end] in _QUANTIFIERS:
        end -= 1
    return source[start:end] if end > start else ""


def _intern(value: str) -> str:
    # A fresh copy first: the plan's strings are then allocated one after the other
    # while the plans are built, on a few memory pages, rather than wherever the
    # configuration's strings happened to land (one page each, over 10,000 hosts).
    if type(value) is not str or not value:
        return value
    return sys.intern((value + "_")[:-1])


def _uri_ops(uri: StringMatcher) -> list[Any]:
    if uri.ignore_case:
        return [OP_URI_MATCH, uri]
    # The length goes first: a path of the wrong length is turned away without
    # reading the value string, which for most hosts is not in the CPU caches
    # (lengths up to 256 are small ints, one object Python shares everywhere).
    if uri.kind == "exact":
        return [OP_URI_EXACT, len(uri.value), _intern(uri.value)]
    if uri.kind == "prefix":
        return [OP_URI_PREFIX, len(uri.value), _intern(uri.value)]
    if uri.kind == "path_prefix":
        return [OP_URI_SEGMENTS, _intern(uri.value)]
    if uri.kind == "regex" and uri.pattern is not None:
        return [OP_URI_REGEX, _intern(regex_literal_prefix(uri.pattern)), uri.pattern]
    return [OP_URI_MATCH, uri]


def _entry_ops(m: RouteMatch) -> list[Any]:
    """The ops of one match entry; their order does not matter (they are AND-ed)."""
    ops: list[Any] = []
    if m.uri is not None:
        ops += _uri_ops(m.uri)
    if m.method is not None:
        if m.method.kind == "exact" and not m.method.ignore_case:
            ops += [OP_METHOD_EXACT, _intern(m.method.value)]
        else:
            ops += [OP_METHOD_MATCH, m.method]
    for h in m.headers:
        name = _intern(h.name)
        if h.matcher is None:
            ops += [OP_HEADER_PRESENT, name]
        elif h.matcher.kind == "exact" and not h.matcher.ignore_case:
            ops += [OP_HEADER_EXACT, name, _intern(h.matcher.value)]
        else:
            ops += [OP_HEADER_MATCH, name, h.matcher]
    for q in m.query_params:
        name = _intern(q.name)
        if q.matcher is None:
            ops += [OP_QUERY_PRESENT, name]
        elif q.matcher.kind == "exact" and not q.matcher.ignore_case:
            ops += [OP_QUERY_EXACT, name, _intern(q.matcher.value)]
        else:
            ops += [OP_QUERY_MATCH, name, q.matcher]
    if (
        m.port is not None
        or m.scheme is not None
        or m.authority is not None
        or m.without_headers
        or m.claims
    ):
        ops += [OP_REST, dataclasses.replace(m, uri=None, method=None, headers=(), query_params=())]
    return ops


def compile_plan(routes: tuple[Route, ...]) -> tuple[Any, ...]:
    """The plan of ``routes`` (see the module docstring for its layout)."""
    plan: list[Any] = []
    for route in routes:
        # A route without match entries accepts every request: one empty entry.
        for ops in [_entry_ops(m) for m in route.matches] or [[]]:
            plan += [len(plan) + 2 + len(ops), route, *ops]
    return tuple(plan)
