"""An HPACK encoder (RFC 7541) for the response headers meshgate sends over HTTP/2.

h2 encodes with hpack's ``Encoder``, which looks every field up in the dynamic table
by a linear scan, logs each field at debug level and Huffman-codes every new literal
with a per-byte Python loop: about a tenth of an HTTP/2 request's time. This encoder
speaks the same HPACK, so any decoder reads it, and finds fields through two dicts:

- a field in the static table, or still in the dynamic table, goes out as its index;
- any other field goes out as a literal (its name as an index when the name is known)
  and is added to the dynamic table, unless it is larger than the table or sensitive
  (``set-cookie``, credentials: never indexed, RFC 7541 §7.1.3);
- strings are sent without Huffman coding: a few more bytes for the literals that
  change from response to response (``date``, a timing header), which repeated
  headers, indexed after their first use, do not pay.

``header_table_size`` is what h2 sets from the peer's SETTINGS_HEADER_TABLE_SIZE; a
change is signalled at the start of the next block, as RFC 7541 §4.2 requires.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

from hpack.table import HeaderTable

_STATIC_FULL: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAME: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FULL.setdefault((_name, _value), _index)
    _STATIC_NAME.setdefault(_name, _index)
_FIRST_DYNAMIC = len(HeaderTable.STATIC_TABLE) + 1  # 62
_NEVER_INDEXED = frozenset((b"set-cookie", b"authorization", b"proxy-authorization", b"cookie"))
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1


def _integer(value: int, prefix_bits: int, flags: int) -> bytes:
    """RFC 7541 §5.1: ``value`` in a ``prefix_bits`` prefix, ``flags`` above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """RFC 7541 §5.2, without Huffman coding."""
    size = len(data)
    if size < 0x7F:
        return bytes((size,)) + data
    return _integer(size, 7, 0) + data


class ResponseEncoder:
    """A drop-in for hpack's ``Encoder`` on an h2 connection (``conn.encoder``)."""

    def __init__(self) -> None:
        self._max = 4096  # RFC 9113's initial SETTINGS_HEADER_TABLE_SIZE
        self._size = 0
        self._inserted = 0  # entries ever added; the newest has number _inserted - 1
        self._entries: deque[tuple[bytes, bytes, int, int]] = deque()  # oldest first
        self._full: dict[tuple[bytes, bytes], int] = {}  # field -> its newest entry's number
        self._names: dict[bytes, int] = {}  # name -> its newest entry's number
        self._size_updates: list[int] = []

    @property
    def header_table_size(self) -> int:
        return self._max

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value == self._max:
            return
        self._max = value
        self._evict(0)
        self._size_updates.append(value)

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        """One header block. ``huffman`` is accepted for h2's call and ignored."""
        out: list[bytes] = []
        if self._size_updates:
            # The smallest size since the last block, then the current one (§4.2).
            smallest = min(self._size_updates)
            if smallest != self._max:
                out.append(_integer(smallest, 5, 0x20))
            out.append(_integer(self._max, 5, 0x20))
            self._size_updates = []
        full = self._full
        for header in headers:
            name, value = header
            index = _STATIC_FULL.get((name, value))
            if index is not None:
                out.append(_integer(index, 7, 0x80))
                continue
            number = full.get((name, value))
            if number is not None:
                out.append(_integer(self._inserted - number - 1 + _FIRST_DYNAMIC, 7, 0x80))
                continue
            name_index = _STATIC_NAME.get(name)
            if name_index is None:
                number = self._names.get(name)
                if number is not None:
                    name_index = self._inserted - number - 1 + _FIRST_DYNAMIC
            size = len(name) + len(value) + _ENTRY_OVERHEAD
            if name in _NEVER_INDEXED or not getattr(header, "indexable", True):
                flags, prefix, add = 0x10, 4, False  # §6.2.3 never indexed
            elif size > self._max:
                flags, prefix, add = 0x00, 4, False  # §6.2.2 without indexing
            else:
                flags, prefix, add = 0x40, 6, True  # §6.2.1 incremental indexing
            if name_index is None:
                out.append(bytes((flags,)) + _string(name))
            else:
                out.append(_integer(name_index, prefix, flags))
            out.append(_string(value))
            if add:
                # The name index above was taken before this eviction, as §4.4 allows.
                self._evict(size)
                number = self._inserted
                self._inserted = number + 1
                self._entries.append((name, value, size, number))
                self._size += size
                full[(name, value)] = number
                self._names[name] = number
        return b"".join(out)

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until ``room`` more octets fit (§4.4)."""
        entries = self._entries
        while entries and self._size + room > self._max:
            name, value, size, number = entries.popleft()
            self._size -= size
            if self._full.get((name, value)) == number:
                del self._full[(name, value)]
            if self._names.get(name) == number:
                del self._names[name]
