"""Listening sockets: one server per listener port, each connection an HTTP/1.1
adapter (which hands over to HTTP/2 when the client asks for it).

It owns binding (``SO_REUSEPORT``, so several worker processes can share a port),
the set of live connections, and the graceful stop: stop accepting, let each
connection finish the request it is on, close idle ones, and after a bounded drain
abort whatever is left. TLS listeners are not served by this version; the caller is
told which ports were skipped and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..routing.table import Listener
from .events import RequestHandler
from .http1 import HTTP1Connection
from .settings import ServerSettings

__all__ = ["CLEARTEXT_PROTOCOLS", "ListenerSet", "partition_listeners"]

# Listener protocols served over cleartext HTTP (HTTP/1.1, h2c upgrade or prior
# knowledge). HTTPS and TLS need certificates, which come with the TLS listeners.
CLEARTEXT_PROTOCOLS = frozenset({"HTTP", "HTTP2", "GRPC"})


def partition_listeners(
    listeners: Iterable[Listener],
) -> tuple[list[Listener], list[Listener]]:
    """(servable now, skipped) by protocol."""
    served: list[Listener] = []
    skipped: list[Listener] = []
    for listener in listeners:
        (served if listener.protocol.upper() in CLEARTEXT_PROTOCOLS else skipped).append(listener)
    return served, skipped


@dataclass
class ListenerSet:
    """The servers of one worker process and their live connections."""

    handler: RequestHandler
    settings: ServerSettings
    address: str = "127.0.0.1"
    servers: list[asyncio.AbstractServer] = field(default_factory=list)
    connections: set[HTTP1Connection] = field(default_factory=set)
    ports: list[int] = field(default_factory=list)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self, ports: Iterable[int], scheme: str = "http") -> list[int]:
        """Bind every port; returns the bound ports (useful when a port is 0)."""
        loop = asyncio.get_running_loop()
        for port in ports:
            server = await loop.create_server(
                lambda port=port: self._new_connection(port, scheme),
                self.address,
                port,
                reuse_port=True,
                backlog=4096,
            )
            self.servers.append(server)
            bound = server.sockets[0].getsockname()[1] if server.sockets else port
            self.ports.append(bound)
        return list(self.ports)

    def _new_connection(self, port: int, scheme: str) -> HTTP1Connection:
        conn = HTTP1Connection(self.handler, self.settings, port, scheme, self._closed)
        self.connections.add(conn)
        self._idle.clear()
        return conn

    def _closed(self, conn: HTTP1Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._idle.set()

    async def stop(self, drain_s: float = 5.0) -> None:
        """Stop accepting, let in-flight requests finish (at most ``drain_s``)."""
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.shutdown()
        if self.connections:
            try:
                async with asyncio.timeout(drain_s):
                    await self._idle.wait()
            except TimeoutError:
                pass
        for conn in list(self.connections):
            conn.abort()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
