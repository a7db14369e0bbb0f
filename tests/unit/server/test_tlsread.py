"""``BufferedReads``: TLS connections on uvloop read through one shared buffer, and
each connection still gets exactly its own bytes, in order, however the reads of
several connections interleave."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path
from typing import Any

import uvloop
from tls_certs import CA

from gateway.server.tlsread import BufferedReads

PAYLOAD_BYTES = 1024 * 1024


class _Collect(asyncio.Protocol):
    def __init__(self, done: asyncio.Future[tuple[bytes, list[str]]]) -> None:
        self.done = done
        self.chunks: list[bytes] = []
        self.calls: list[str] = []
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.calls.append("made")

    def data_received(self, data: bytes) -> None:
        assert type(data) is bytes  # a copy, never a view of the shared buffer
        self.chunks.append(data)
        if sum(map(len, self.chunks)) >= PAYLOAD_BYTES:
            self.transport.write(hashlib.sha256(b"".join(self.chunks)).digest())

    def eof_received(self) -> bool:
        self.calls.append("eof")
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        if not self.done.done():
            self.done.set_result((b"".join(self.chunks), self.calls))


def test_interleaved_tls_connections_each_get_their_own_bytes(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    pair = ca.issue("a", dns=("a.example.com",))
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pair.cert), str(pair.key))
    client_context = ssl.create_default_context(cafile=str(ca.path))

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        results: list[asyncio.Future[tuple[bytes, list[str]]]] = []
        wrappers: list[BufferedReads] = []

        def factory() -> BufferedReads:
            done: asyncio.Future[tuple[bytes, list[str]]] = loop.create_future()
            results.append(done)
            wrapper = BufferedReads(_Collect(done))
            wrappers.append(wrapper)
            return wrapper

        server = await loop.create_server(factory, "127.0.0.1", 0, ssl=server_context)
        port = server.sockets[0].getsockname()[1]

        async def client(fill: int) -> bytes:
            payload = bytes([fill]) * (PAYLOAD_BYTES // 2) + bytes(range(256)) * (
                PAYLOAD_BYTES // 512
            )
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context, server_hostname="a.example.com"
            )
            for offset in range(0, len(payload), 16 * 1024):
                writer.write(payload[offset : offset + 16 * 1024])
                await writer.drain()
            digest = await reader.readexactly(32)
            writer.close()
            await writer.wait_closed()
            assert digest == hashlib.sha256(payload).digest()
            return payload

        sent = await asyncio.gather(*(client(fill) for fill in (1, 2, 3, 4)))
        received = [await done for done in results]
        server.close()
        assert sorted(data for data, _ in received) == sorted(sent)
        for _, calls in received:
            assert calls[0] == "made" and calls[-1] == "lost"
        # The wrapped protocol is dropped once the connection is gone.
        assert all(not isinstance(w.protocol, _Collect) for w in wrappers)

    uvloop.run(asyncio.wait_for(scenario(), 30))
