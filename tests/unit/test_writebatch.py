"""Small writes after the first of a loop turn are held to the end of the turn
(gateway.writebatch), over real sockets on 127.0.0.1: nothing is lost or reordered,
a close sends what is held, a reset drops it, and a lone request is never held."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

from gateway import writebatch
from gateway.server.http1 import HTTP1Connection
from gateway.server.settings import ServerSettings
from gateway.upstream.pool import EndpointPool, UpstreamConnection

SMALL = writebatch.BATCH_MAX_BYTES


def run(main: Callable[[], Awaitable[None]]) -> None:
    uvloop.run(asyncio.wait_for(main(), 10))


async def _never_called(stream: Any) -> None:
    raise AssertionError("no request is sent in these tests")


async def _downstream_pair() -> tuple[HTTP1Connection, socket.socket]:
    """An HTTP1Connection on the server side of a real TCP connection, and the
    client's socket (blocking reads run in a thread)."""
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[HTTP1Connection] = loop.create_future()

    class Accepted(HTTP1Connection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            accepted.set_result(self)

    def factory() -> HTTP1Connection:
        return Accepted(_never_called, ServerSettings(), 0, "http")

    server = await loop.create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn = await accepted
    server.close()
    return conn, client


def _read_all(sock: socket.socket) -> bytes:
    data = bytearray()
    sock.settimeout(5)
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    sock.close()
    return bytes(data)


def test_the_first_small_write_of_a_turn_goes_now_and_later_ones_at_its_end() -> None:
    flushed: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def flush(self) -> None:
            flushed.append(self.name)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b, c = Recorder("a"), Recorder("b"), Recorder("c")
        assert writebatch.gather(a, loop) is False  # the turn's first: write it now
        assert writebatch.gather(b, loop) is True
        assert writebatch.gather(c, loop) is True
        assert flushed == []
        await asyncio.sleep(0)  # the end of the turn
        assert flushed == ["b", "c"]
        assert writebatch.gather(a, loop) is False  # a new turn starts afresh
        await asyncio.sleep(0)
        assert flushed == ["b", "c"]

    run(main)


def test_held_writes_keep_their_order_around_a_large_write_and_a_close_sends_them() -> None:
    big = b"B" * (SMALL + 1)

    async def main() -> None:
        conn, client = await _downstream_pair()
        reader = asyncio.get_running_loop().run_in_executor(None, _read_all, client)
        conn.write(b"one,")  # the turn's first: sent now
        assert conn._out is None
        conn.write(b"two,")  # held
        assert conn._out == [b"two,"]
        conn.write(big)  # large: what is held goes first, then this
        assert conn._out is None
        conn.write(b",three")  # held again
        conn.close()  # sends what is held before closing
        assert await reader == b"one,two," + big + b",three"

    run(main)


def test_held_writes_go_out_at_the_end_of_the_turn_on_every_connection() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        first, first_client = await _downstream_pair()
        second, second_client = await _downstream_pair()
        first.write(b"first")
        second.write(b"second")  # the same turn: held
        assert second._out == [b"second"]
        await asyncio.sleep(0)
        assert second._out is None
        for conn in (first, second):
            conn.close()
        received = await asyncio.gather(
            loop.run_in_executor(None, _read_all, first_client),
            loop.run_in_executor(None, _read_all, second_client),
        )
        assert received == [b"first", b"second"]

    run(main)


def test_a_reset_drops_what_is_held() -> None:
    async def main() -> None:
        conn, client = await _downstream_pair()
        reader = asyncio.get_running_loop().run_in_executor(None, _read_all, client)
        conn.write(b"sent")
        conn.write(b"held")
        conn.abort()
        await asyncio.sleep(0)  # the end of the turn flushes nothing
        received = await reader
        assert b"held" not in received

    run(main)


def test_upstream_request_heads_are_held_and_sent_in_order() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        pool = EndpointPool("127.0.0.1", port, 4)
        _, first = await loop.create_connection(
            lambda: UpstreamConnection(pool, 65536), "127.0.0.1", port
        )
        _, second = await loop.create_connection(
            lambda: UpstreamConnection(pool, 65536), "127.0.0.1", port
        )
        first_peer, _ = listener.accept()
        second_peer, _ = listener.accept()
        listener.close()
        first.write(b"GET /a HTTP/1.1\r\n\r\n")  # the turn's first
        second.write(b"GET /b HTTP/1.1\r\n\r\n")  # held to the end of the turn
        second.write(b"GET /c HTTP/1.1\r\n\r\n")  # joins it, in order
        assert second._out == [b"GET /b HTTP/1.1\r\n\r\n", b"GET /c HTTP/1.1\r\n\r\n"]
        await asyncio.sleep(0)
        assert second._out is None
        first.close()
        second.close()
        received = await asyncio.gather(
            loop.run_in_executor(None, _read_all, first_peer),
            loop.run_in_executor(None, _read_all, second_peer),
        )
        assert received == [
            b"GET /a HTTP/1.1\r\n\r\n",
            b"GET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n",
        ]

    run(main)
