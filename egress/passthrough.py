"""SNI-routed TLS passthrough at the egress gateway.

A PASSTHROUGH Gateway server hands each connection here (``ListenerSet.passthrough``)
with the ClientHello's server name still unread in the socket. The destination is
the VirtualService ``tls[]`` route that matched the name, else the registry's
MESH_EXTERNAL entry for ``<name>:<port>``; under REGISTRY_ONLY a route to a host no
ServiceEntry declares, or a name no entry covers, is refused by resetting the
connection. Names are resolved as for HTTP (``egress.forward.Egress``), the bytes are
spliced unread (the client's TLS goes end to end), and the tunnel is one access-log
line when it closes, with status 0 (a TCP tunnel has none, as in Envoy's TCP proxy
log). It is counted in Istio's TCP metrics (``gateway.metrics.TcpMetrics``), not as a
request: opened once both sides are connected, closed with the bytes carried each
way; a connection refused or never connected upstream is opened and closed at once
under its flags (``NR``, ``UF``). Its destination is the external host.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from time import perf_counter
from typing import Any

from gateway.errors import GatewayError
from gateway.routing.table import SNIRoute
from gateway.stages import RequestContext, TunnelStream, tunnel_context
from gateway.upstream.websocket import splice

from .forward import Egress, Held

__all__ = ["PassthroughHandler"]


class PassthroughHandler:
    """``ListenerSet.passthrough`` for an egress gateway."""

    def __init__(self, egress: Egress, snapshots: Any, access_log: Any, tcp_metrics: Any) -> None:
        self.egress = egress
        self.snapshots = snapshots  # anything with ``.current``
        self.access_log = access_log
        self.tcp_metrics = tcp_metrics  # gateway.metrics.TcpMetrics or None

    async def __call__(
        self, conn: socket.socket, sni: str | None, route: SNIRoute | None, port: int
    ) -> None:
        try:
            peer = conn.getpeername()[0]
        except OSError:
            peer = ""
        name = (sni or "").lower()
        ctx, stream = tunnel_context(name, port, peer, self.snapshots.current)
        try:
            await self._serve(ctx, stream, conn, name, route)
        except GatewayError as error:
            ctx.add_flag(error.flag)
            _reset(conn)
        except asyncio.CancelledError:
            ctx.add_flag("DC")
            _reset(conn)
            raise
        finally:
            now = perf_counter()
            if self.access_log is not None:
                self.access_log.log(ctx, now)
            metrics = self.tcp_metrics
            if metrics is not None:
                if stream.opened:
                    metrics.closed(
                        ctx.upstream_cluster, ctx.flags, ctx.bytes_received, ctx.bytes_sent
                    )
                else:
                    metrics.refused(ctx.upstream_cluster, ctx.flags)

    async def _serve(
        self,
        ctx: RequestContext,
        stream: TunnelStream,
        conn: socket.socket,
        name: str,
        route: SNIRoute | None,
    ) -> None:
        egress = self.egress
        if not name:
            raise egress.refuse(ctx, "-", "no SNI in the ClientHello")
        if route is not None:
            ctx.route = route  # type: ignore[assignment]  # the log reads origin and name
            cluster_name = route.destinations[0].cluster
            if len(route.destinations) > 1:
                pick = egress.pick_weighted(route)
                cluster_name = pick.cluster
        else:
            made = egress.registry_route(ctx, connect=True)
            ctx.route = made
            cluster_name = made.action.destinations[0].cluster  # type: ignore[union-attr]
        cluster = await egress.cluster_for(ctx, cluster_name)
        endpoint = egress.pools.pick_endpoint(cluster)
        ctx.upstream_cluster = cluster.name
        ctx.upstream_host = f"{endpoint.address}:{endpoint.port}"
        up, up_held = await egress.connect(ctx, endpoint.address, endpoint.port)
        loop = asyncio.get_running_loop()
        try:
            down, down_held = await loop.connect_accepted_socket(Held, conn)
        except OSError:
            up.close()
            raise
        stream.opened = True
        if self.tcp_metrics is not None:
            self.tcp_metrics.opened(cluster.name)
        sent_up, sent_down = await splice(down, bytes(down_held.buffer), up, bytes(up_held.buffer))
        ctx.bytes_received += sent_up
        ctx.bytes_sent += sent_down


def _reset(conn: socket.socket) -> None:
    """Close with RST: a refused TLS client sees its connection reset."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        conn.close()
