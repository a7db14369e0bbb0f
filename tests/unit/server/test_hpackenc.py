"""``ResponseEncoder`` speaks HPACK: hpack's own decoder, fed every block in turn,
reads back exactly the fields encoded, across table-size changes and evictions."""

from __future__ import annotations

from hpack import Decoder, Encoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server.hpackenc import ResponseEncoder

Fields = list[tuple[bytes, bytes]]

NAMES = [
    b":status", b"server", b"date", b"content-type", b"content-length", b"set-cookie",
    b"x-envoy-upstream-service-time", b"alt-svc", b"x-a", b"x-" + b"n" * 200,
]  # fmt: skip
VALUES = [b"", b"200", b"404", b"text/plain", b"0", b"1", b"v" * 130, b"v" * 5000]

fields = st.lists(
    st.tuples(
        st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=20)),
        st.one_of(st.sampled_from(VALUES), st.binary(max_size=300)),
    ),
    max_size=10,
)
# Each step: a block, or the peer's SETTINGS_HEADER_TABLE_SIZE changing (several
# changes may come between two blocks).
steps = st.lists(
    st.one_of(fields, st.sampled_from([0, 64, 100, 256, 4096, 8192])), min_size=1, max_size=30
)


@settings(max_examples=800, suppress_health_check=[HealthCheck.too_slow])
@given(steps)
def test_hpacks_own_decoder_reads_every_block_back(steps: list[Fields | int]) -> None:
    encoder = ResponseEncoder()
    decoder = Decoder()
    for step in steps:
        if isinstance(step, int):
            encoder.header_table_size = step
            decoder.max_allowed_table_size = step
            continue
        block = encoder.encode(step)
        assert decoder.decode(block, raw=True) == step


def test_repeated_fields_are_sent_as_indexes() -> None:
    encoder = ResponseEncoder()
    head = [(b":status", b"200"), (b"server", b"backend"), (b"content-type", b"text/plain")]
    first = encoder.encode(head)
    second = encoder.encode(head)
    assert len(second) == 3  # one index octet per field
    assert len(first) > len(second)
    # hpack's encoder, which Huffman-codes, is not far from it on the first block.
    assert len(first) <= len(Encoder().encode(head)) + 8


def test_sensitive_fields_are_never_indexed() -> None:
    encoder = ResponseEncoder()
    head = [(b"set-cookie", b"session=secret")]
    first, second = encoder.encode(head), encoder.encode(head)
    assert first == second  # never added to the table, so never an index
    assert first[0] & 0xF0 == 0x10  # the never-indexed literal form (RFC 7541 §6.2.3)


def test_a_smaller_table_is_signalled_before_the_next_block() -> None:
    encoder = ResponseEncoder()
    encoder.encode([(b"x-a", b"1")])
    encoder.header_table_size = 0
    encoder.header_table_size = 256
    block = encoder.encode([(b"x-a", b"1")])
    # Two size updates (the smallest, then the final one), then a literal: the
    # entry was evicted when the table went to zero.
    assert block[0] == 0x20 and block[1] & 0xE0 == 0x20
    decoder = Decoder()
    decoder.decode(ResponseEncoder().encode([(b"x-a", b"1")]))
    assert decoder.decode(block, raw=True) == [(b"x-a", b"1")]
