"""Istio's duration strings (``1s``, ``100ms``, ``1.5s``, ``1m``, ``1h``, ``1h30m``).

Istio accepts Go's duration syntax: one or more ``<number><unit>`` terms with units
``h``, ``m``, ``s``, ``ms``, ``us`` (or ``µs``) and ``ns``; decimals are allowed in
each term. Istio then requires at least 1 ms and whole milliseconds; the validator
applies those limits, the compiler uses ``parse_duration_s`` to get the value.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["DurationError", "parse_duration_s"]

_TERM = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NS_PER_UNIT = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # micro sign
    "μs": 1_000,  # Greek mu; Go accepts both spellings
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_NS_PER_MS = 1_000_000


class DurationError(ValueError):
    """A duration string that Istio would refuse; ``str()`` is the reason."""


def _nanoseconds(text: str) -> Fraction:
    if not text:
        raise DurationError('"" is not a duration (examples: 1s, 100ms, 1.5s, 1m, 1h)')
    total = Fraction(0)
    pos = 0
    while pos < len(text):
        term = _TERM.match(text, pos)
        if term is None:
            raise DurationError(f'"{text}" is not a duration (examples: 1s, 100ms, 1.5s, 1m, 1h)')
        total += Fraction(term.group(1)) * _NS_PER_UNIT[term.group(2)]
        pos = term.end()
    return total


def parse_duration_s(text: str, *, minimum_ms: int = 1) -> float:
    """Seconds in an Istio duration; ``DurationError`` if Istio would refuse it.

    Refused: bad syntax (a bare number without a unit included), less than
    ``minimum_ms`` milliseconds, and anything finer than a millisecond (Istio: "only
    durations to ms precision are supported").
    """
    nanos = _nanoseconds(text)
    if nanos % _NS_PER_MS:
        raise DurationError(f'"{text}" is finer than a millisecond; use whole milliseconds')
    if nanos < minimum_ms * _NS_PER_MS:
        raise DurationError(f'"{text}" is shorter than the minimum of {minimum_ms}ms')
    return float(nanos / 1_000_000_000)
