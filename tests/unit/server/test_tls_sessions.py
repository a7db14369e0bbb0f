"""The gateway's server contexts resume no sessions and cache none: no TLS 1.3
tickets are issued (a resumed session would skip client-certificate checks against
a rotated CA), and OpenSSL's server-side session cache stays empty however many
clients connect (it would otherwise keep up to 20,480 sessions, tens of MB)."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

from tls_certs import CA

from gateway.routing.table import Origin, TLSServer
from gateway.server.tls import CredentialPaths, build_server_context


def test_no_tickets_are_issued_and_no_session_is_cached(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    pair = ca.issue("a", dns=("a.example.com",))
    server = TLSServer(hosts=("a.example.com",), mode="SIMPLE", origin=Origin("Gateway", "d", "g"))
    context = build_server_context(server, CredentialPaths(str(pair.cert), str(pair.key), None))
    client = ssl.create_default_context(cafile=str(ca.path))

    async def scenario() -> list[bool]:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(1))
            await writer.drain()
            writer.close()

        listening = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
        port = listening.sockets[0].getsockname()[1]
        tickets = []
        for _ in range(20):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client, server_hostname="a.example.com"
            )
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"  # TLS 1.3 tickets arrive by now
            session = writer.get_extra_info("ssl_object").session
            tickets.append(session is not None and session.has_ticket)
            writer.close()
        listening.close()
        return tickets

    tickets = asyncio.run(asyncio.wait_for(scenario(), 20))
    assert tickets == [False] * 20
    assert context.session_stats()["number"] == 0
    assert context.session_stats()["accept_good"] == 20
