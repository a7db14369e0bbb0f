"""The HTTP/2 adapter's HPACK decoder (``_CeilingDecoder.decode``) against hpack's own
``Decoder.decode``: over sequences of generated header blocks (indexed, literal,
never-indexed, Huffman or not, table-size updates) and over arbitrary bytes, the two
must give the same fields, keep the same dynamic table and raise the same errors."""

from __future__ import annotations

from typing import Any

from hpack import Decoder, Encoder, NeverIndexedHeaderTuple
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server.http2 import _CeilingDecoder

CEILING = 64 * 1024

names = st.sampled_from(
    [b":method", b":path", b":authority", b":scheme", b"user-agent", b"accept", b"x-id", b"cookie"]
)
values = st.one_of(
    st.sampled_from([b"GET", b"/", b"/index.html", b"https", b"a.test", b"curl/8"]),
    st.binary(max_size=60),
)
field = st.tuples(names, values, st.booleans())  # (name, value, never indexed)
block = st.tuples(st.lists(field, max_size=10), st.booleans())  # (fields, huffman)
step = st.one_of(block, st.sampled_from([0, 256, 4096]))  # a table-size change


def _outcome(decoder: Decoder, data: bytes) -> tuple[Any, ...]:
    try:
        fields = decoder.decode(data, raw=True)
    except Exception as exc:
        return ("error", type(exc))
    flat = [
        (bytes(n), bytes(v), isinstance(h, NeverIndexedHeaderTuple)) for h in fields for n, v in [h]
    ]
    table = decoder.header_table
    return ("ok", flat, list(table.dynamic_entries), table._current_size, table.maxsize)


def _pair() -> tuple[Decoder, _CeilingDecoder]:
    theirs = Decoder(CEILING)
    theirs.max_header_list_size = CEILING
    return theirs, _CeilingDecoder(CEILING)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(step, min_size=1, max_size=8))
def test_same_fields_and_table_as_hpack_over_generated_blocks(steps: list[Any]) -> None:
    encoder = Encoder()
    theirs, ours = _pair()
    for item in steps:
        if isinstance(item, int):
            encoder.header_table_size = item  # signalled at the start of the next block
            continue
        fields, huffman = item
        headers = [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in fields]
        data = encoder.encode(headers, huffman=huffman)
        assert _outcome(ours, data) == _outcome(theirs, data)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_same_verdict_as_hpack_on_arbitrary_bytes(blocks: list[bytes]) -> None:
    theirs, ours = _pair()
    for data in blocks:
        expected = _outcome(theirs, data)
        assert _outcome(ours, data) == expected
        if expected[0] == "error":
            break  # h2 ends the connection: the table state after an error is moot


def test_oversized_list_is_refused_as_hpack_does() -> None:
    encoder = Encoder()
    data = encoder.encode([(b"x-big", b"v" * 4000)] + [(b"x-big", b"v" * 4000)] * 20)
    theirs, ours = _pair()
    assert _outcome(ours, data) == _outcome(theirs, data)
    assert _outcome(ours, data)[0] == "error"
