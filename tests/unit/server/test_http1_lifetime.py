"""A closed HTTP/1.1 connection is freed by reference counting alone, at once.

Under a stream of short TLS connections, protocol objects left for the cyclic
garbage collector kept their transports (and OpenSSL's per-connection state) alive
until the next full collection: tens of MB of resident memory. This checks, on real
sockets and with the collector off, that nothing keeps a closed connection alive."""

from __future__ import annotations

import asyncio
import gc
import weakref

from gateway.server.events import DownstreamStream, ResponseHead
from gateway.server.http1 import HTTP1Connection
from gateway.server.settings import ServerSettings


async def _answer(stream: DownstreamStream) -> None:
    await stream.send_head(ResponseHead(200, [("content-length", "2")]), False)
    await stream.send_body(b"ok", True)


def test_a_closed_connection_is_freed_without_the_garbage_collector() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        made: list[weakref.ref[HTTP1Connection]] = []
        closed = asyncio.Event()

        def factory() -> HTTP1Connection:
            conn = HTTP1Connection(_answer, ServerSettings(), 8080, on_close=lambda _: closed.set())
            made.append(weakref.ref(conn))
            return conn

        server = await loop.create_server(factory, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert (await reader.read()).endswith(b"ok")
        writer.close()
        await closed.wait()
        # connection_lost has run; let the loop finish the callbacks that follow it.
        for _ in range(100):
            if made[0]() is None:
                break
            await asyncio.sleep(0)
        server.close()
        assert made[0]() is None, gc.get_referrers(made[0]())

    gc.disable()
    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gc.enable()


def test_a_closed_upstream_connection_is_freed_without_the_garbage_collector() -> None:
    from gateway.routing.table import Endpoint
    from gateway.upstream.pool import UpstreamConnection, UpstreamPools

    async def scenario() -> None:
        async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        backend = await asyncio.start_server(close_at_once, "127.0.0.1", 0)
        port = backend.sockets[0].getsockname()[1]
        pools = UpstreamPools()
        conn = await pools.open(pools.pool_for(Endpoint("127.0.0.1", port)))
        while not conn.closed:
            await asyncio.sleep(0)  # until connection_lost has run (bounded by wait_for)
        del conn
        for _ in range(100):
            if not any(isinstance(o, UpstreamConnection) for o in gc.get_objects()):
                break
            await asyncio.sleep(0)
        backend.close()
        assert not any(isinstance(o, UpstreamConnection) for o in gc.get_objects())

    gc.disable()
    try:
        asyncio.run(asyncio.wait_for(scenario(), 10))
    finally:
        gc.enable()
