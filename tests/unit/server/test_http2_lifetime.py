"""A closed HTTP/2 connection is freed by reference counting alone, at once.

As for HTTP/1.1 (test_http1_lifetime.py): a protocol object left in reference cycles
keeps its TLS transport, and OpenSSL's per-connection state and read buffer behind
it, alive until the next full garbage collection. This checks, over real TLS sockets
with ALPN h2 on uvloop and with the collector off, that nothing keeps a closed
HTTP/2 connection or its transport alive."""

from __future__ import annotations

import asyncio
import gc
import ssl
import weakref
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import uvloop
from tls_certs import CA

from gateway.server.events import DownstreamStream, ResponseHead
from gateway.server.http2 import H2Protocol
from gateway.server.settings import ServerSettings


async def _answer(stream: DownstreamStream) -> None:
    await stream.send_head(ResponseHead(200, [("content-length", "2")]), False)
    await stream.send_body(b"ok", True)


async def _get(port: int, client_context: ssl.SSLContext) -> int:
    """One GET over a fresh connection; returns the response status."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=client_context, server_hostname="a.example.com"
    )
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":path", "/"), (":scheme", "https"), (":authority", "a")]
    conn.send_headers(1, headers, end_stream=True)
    writer.write(conn.data_to_send())
    status = 0
    ended = False
    while not ended:
        data = await reader.read(65536)
        assert data, "connection closed before the response ended"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.StreamEnded):
                ended = True
        writer.write(conn.data_to_send())
    writer.close()
    await writer.wait_closed()
    return status


def test_a_closed_tls_connection_is_freed_without_the_garbage_collector(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    pair = ca.issue("a", dns=("a.example.com",))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pair.cert), str(pair.key))
    server_context.set_alpn_protocols(["h2"])
    client_context = ssl.create_default_context(cafile=str(ca.path))
    client_context.set_alpn_protocols(["h2"])

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        protocols: list[weakref.ref[H2Protocol]] = []
        # The TLS state: the transport itself cannot be weakly referenced.
        tls_objects: list[weakref.ref[Any]] = []
        closed = asyncio.Event()

        class Watched(H2Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                tls_objects.append(weakref.ref(transport.get_extra_info("ssl_object")))
                super().connection_made(transport)

        def factory() -> H2Protocol:
            proto = Watched(_answer, ServerSettings(), 8443, "https", "")
            proto.on_close = lambda _: closed.set()
            protocols.append(weakref.ref(proto))
            return proto

        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]
        assert await _get(port, client_context) == 200
        await closed.wait()
        # connection_lost has run; let the loop finish the callbacks that follow it.
        for _ in range(100):
            if protocols[0]() is None and tls_objects[0]() is None:
                break
            await asyncio.sleep(0)
        server.close()
        assert protocols[0]() is None, gc.get_referrers(protocols[0]())
        assert tls_objects[0]() is None, gc.get_referrers(tls_objects[0]())

    gc.disable()
    try:
        uvloop.run(asyncio.wait_for(scenario(), 10))
    finally:
        gc.enable()
