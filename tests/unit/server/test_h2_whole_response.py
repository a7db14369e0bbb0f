"""``_H2Connection.send_whole_response`` against h2's own ``send_headers`` +
``send_data``: for generated responses, two server connections in the same state
must put the same bytes on the wire and end in the same stream and window state,
with HPACK tables that stay in step (the next response on each encodes alike)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.exceptions
import h2.settings
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.server.http2 import _H2Connection

REQUEST = [(":method", "GET"), (":scheme", "https"), (":authority", "a.test"), (":path", "/")]


def _pair(max_frame: int) -> tuple[h2.connection.H2Connection, list[_H2Connection]]:
    """A client and two servers that received the same preface, settings and requests
    (streams 1, 3 and 5)."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: max_frame})
    for stream_id in (1, 3, 5):
        client.send_headers(stream_id, REQUEST, end_stream=stream_id != 5)
    wire = client.data_to_send()
    servers = []
    for _ in range(2):
        server = _H2Connection.for_server(100)  # as the adapter makes it
        server.initiate_connection()
        server.receive_data(wire)
        server.data_to_send()
        servers.append(server)
    return client, servers


def _state(server: _H2Connection, stream_id: int) -> tuple[object, ...]:
    stream = server.streams.get(stream_id)
    closed = server._closed_streams.get(stream_id)
    if stream is None:
        return ("gone", closed)
    machine = stream.state_machine
    return (
        machine.state,
        machine.headers_sent,
        machine.trailers_sent,
        machine.stream_closed_by,
        stream.outbound_flow_control_window,
        stream.request_method,
        server.outbound_flow_control_window,
        server.state_machine.state,
    )


names = st.sampled_from(
    [b"content-type", b"content-length", b"server", b"set-cookie", b"x-a", b"x-long", b"date"]
)
values = st.binary(min_size=0, max_size=40).map(lambda v: v.replace(b"\r", b"").strip())
fields = st.lists(st.tuples(names, values), max_size=8)
statuses = st.sampled_from([200, 204, 301, 404, 500, 503])


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    status=statuses,
    first=fields,
    second=fields,
    size=st.sampled_from([0, 1, 100, 16_384, 65_535]),
    long_value=st.sampled_from([0, 20_000, 40_000]),
    max_frame=st.sampled_from([16_384, 65_536]),
    stream_id=st.sampled_from([1, 5]),  # half-closed (remote), and still open
)
def test_same_bytes_and_state_as_h2s_two_calls(
    status: int,
    first: list[tuple[bytes, bytes]],
    second: list[tuple[bytes, bytes]],
    size: int,
    long_value: int,
    max_frame: int,
    stream_id: int,
) -> None:
    _, (theirs, ours) = _pair(max_frame)
    headers = [(b":status", str(status).encode()), *first]
    if long_value:
        headers.append((b"x-long", b"v" * long_value))  # forces CONTINUATION frames
    body = b"b" * size
    if size > theirs.local_flow_control_window(stream_id) or size > theirs.max_outbound_frame_size:
        return  # the caller never takes this path then
    theirs.send_headers(stream_id, headers, end_stream=not size)
    if size:
        theirs.send_data(stream_id, body, end_stream=True)
    ours.send_whole_response(stream_id, headers, body)
    assert ours.data_to_send() == theirs.data_to_send()
    assert _state(ours, stream_id) == _state(theirs, stream_id)
    # The HPACK tables moved alike: the next response on another stream encodes alike.
    follow = [(b":status", b"200"), *second]
    theirs.send_headers(3, follow, end_stream=True)
    ours.send_whole_response(3, follow, b"")
    assert ours.data_to_send() == theirs.data_to_send()
    assert _state(ours, 3) == _state(theirs, 3)


def test_a_stream_already_ended_raises_as_h2_does() -> None:
    _, (_, ours) = _pair(16_384)
    ours.send_whole_response(1, [(b":status", b"200")], b"done")
    with pytest.raises(h2.exceptions.StreamClosedError):
        ours.send_whole_response(1, [(b":status", b"200")], b"again")
