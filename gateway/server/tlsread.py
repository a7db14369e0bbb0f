"""Decrypted TLS bytes handed to a plain protocol through one shared buffer.

uvloop's TLS transport reads decrypted data in one of two ways. For a plain
``asyncio.Protocol`` it asks OpenSSL for up to 256 KiB at a time into a new
``bytes`` object, which ``malloc`` serves and the read then shrinks: one 256 KiB
allocation per read. For an ``asyncio.BufferedProtocol`` it reads straight into the
buffer the protocol offers, with no allocation of its own, and checks what is
pending instead of ending each read on an ``SSLWantReadError``.

``BufferedReads`` wraps the HTTP/1.1 and HTTP/2 adapters (plain protocols, as
their cleartext listeners need) so that TLS connections take the second way. The
buffer is one per process: uvloop asks for it and reports what it wrote in the same
call, and the adapter copies the bytes out before returning, so no connection ever
sees another's data. A protocol that later installs another one on the transport
(an HTTP/2 or WebSocket hand-over) simply reads the first way from then on.

It also keeps the memory lean: with ``gateway.memory``'s fixed mmap threshold, a
256 KiB allocation per read would be an ``mmap``/``munmap`` pair per read (keep-alive
HTTPS measured about a third slower), and with glibc's dynamic threshold it churns
the heap that every connection's own buffers live in.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["BufferedReads"]

_SIZE = 256 * 1024  # what uvloop reads at most in one go
_BUFFER = bytearray(_SIZE)
_VIEW = memoryview(_BUFFER)


class BufferedReads(asyncio.BufferedProtocol):
    """The protocol a TLS transport sees; everything but reads is passed through."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_buffer(self, sizehint: int) -> memoryview:
        return _VIEW

    def buffer_updated(self, nbytes: int) -> None:
        self.protocol.data_received(_VIEW[:nbytes].tobytes())

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        protocol, self.protocol = self.protocol, _Closed
        protocol.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()


class _ClosedProtocol(asyncio.Protocol):
    """What a closed ``BufferedReads`` forwards to: nothing is delivered any more."""


_Closed = _ClosedProtocol()
