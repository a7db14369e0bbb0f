"""WebSocket (and any HTTP/1.1 ``Upgrade``) proxied as a byte tunnel.

The upgrade request goes upstream on a connection of its own (never a pooled one:
after ``101`` it stops being HTTP). ``UpstreamHandshake`` reads the response head;
on ``101 Switching Protocols`` the caller passes the head on to the client and
``splice`` joins the two transports: bytes are copied both ways as they come, and
back-pressure is the transports' own — when one side's write buffer is over its
high-water mark, the other side stops being read until it drains. Either side
closing (or half-closing) ends the tunnel; both transports are closed then.

Any other answer is an ordinary HTTP response with a body framed by Content-Length
or by the close (a refused handshake, typically 400/401/403), which the caller sends
to the client as such.
"""

from __future__ import annotations

import asyncio

from ..errors import UpstreamProtocolError, UpstreamReset

__all__ = ["Splice", "UpstreamHandshake", "splice"]

_MAX_HEAD_BYTES = 64 * 1024
_MAX_REFUSAL_BODY_BYTES = 1024 * 1024


class UpstreamHandshake(asyncio.Protocol):
    """Reads the upstream's answer to an upgrade request."""

    def __init__(self, host_label: str) -> None:
        loop = asyncio.get_running_loop()
        self.host_label = host_label
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.rest = b""
        self.head: asyncio.Future[None] = loop.create_future()
        self.body_done: asyncio.Future[None] = loop.create_future()
        self.content_length: int | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head.done():
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD_BYTES:
                    self._fail(UpstreamProtocolError(f"{self.host_label}: response head too long"))
                return
            head, rest = bytes(self.buffer[:end]), bytes(self.buffer[end + 4 :])
            self.buffer = bytearray(rest)
            try:
                self._parse(head)
            except ValueError as exc:
                self._fail(UpstreamProtocolError(f"{self.host_label}: bad response head: {exc}"))
                return
            if self.status == 101 and self.transport is not None:
                # From here the bytes belong to the tunnel: hold them until it is built.
                self.transport.pause_reading()
            self.head.set_result(None)
        self._check_body()

    def _parse(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(lines[0][:60].decode("latin-1"))
        self.status = int(rest[:3])
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError("malformed header line")
            name = name.lower()
            value = value.strip()
            if name == b"content-length":
                self.content_length = int(value)
            self.headers.append((name, value))

    def _check_body(self) -> None:
        if self.status == 101 or not self.head.done() or self.body_done.done():
            return
        if self.content_length is not None and len(self.buffer) >= self.content_length:
            self.body_done.set_result(None)
        elif len(self.buffer) > _MAX_REFUSAL_BODY_BYTES:
            self._fail(UpstreamProtocolError(f"{self.host_label}: refusal body too long"))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.head.done():
            self.head.set_exception(UpstreamReset(f"{self.host_label}: closed before the head"))
        if not self.body_done.done():
            self.body_done.set_result(None)  # a body that runs to the close

    def _fail(self, error: Exception) -> None:
        for future in (self.head, self.body_done):
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.close()

    def take_rest(self) -> bytes:
        rest, self.buffer = bytes(self.buffer), bytearray()
        return rest


class Splice(asyncio.Protocol):
    """Copies what its transport receives into ``peer``; pauses the peer's reading
    while its own transport cannot take more writes."""

    def __init__(self, done: asyncio.Future[None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.done = done
        self.bytes = 0  # received on this side, copied to the peer

    def data_received(self, data: bytes) -> None:
        self.bytes += len(data)
        if self.peer is not None:
            self.peer.write(data)

    def eof_received(self) -> bool:
        # One side finished: WebSocket has its own close handshake, so a TCP
        # half-close ends the tunnel; buffered bytes are still flushed by close().
        self._finish()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()

    def _finish(self) -> None:
        if self.peer is not None and not self.peer.is_closing():
            self.peer.close()
        if not self.done.done():
            self.done.set_result(None)


async def splice(
    down: asyncio.Transport, down_rest: bytes, up: asyncio.Transport, up_rest: bytes
) -> tuple[int, int]:
    """Join two transports until either closes. Returns the bytes copied
    (client to upstream, upstream to client), including what was already read."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    from_client = Splice(done)
    from_upstream = Splice(done)
    from_client.transport, from_client.peer = down, up
    from_upstream.transport, from_upstream.peer = up, down
    down.set_protocol(from_client)
    up.set_protocol(from_upstream)
    if down_rest:
        from_client.data_received(down_rest)
    if up_rest:
        from_upstream.data_received(up_rest)
    down.resume_reading()
    up.resume_reading()
    try:
        await done
    finally:
        for transport in (down, up):
            if not transport.is_closing():
                transport.close()
    return from_client.bytes, from_upstream.bytes
