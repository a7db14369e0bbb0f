"""The egress gateway's request path: registry-decided routes, name resolution, CONNECT.

Two stages stand in for the gateway's own (``gateway.pipeline.Pipeline`` takes them
as ``route_stage`` and ``upstream_stage``) and add to them, never repeat them:

``EgressRouteStage``
    routes with the VirtualServices first, as ``RouteStage`` does. A request no
    VirtualService routes is decided by the registry (``egress.registry``): a host a
    MESH_EXTERNAL ServiceEntry declares, on a port it declares, gets a route to that
    service; with ``ALLOW_ANY`` any other host gets one to itself; anything else is
    refused, 502 with flag ``NR`` and the caller and destination in the log. A
    ``CONNECT`` is always decided by the registry (a VirtualService routes HTTP, not
    tunnels).

``EgressUpstreamStage``
    turns the route's cluster into one the upstream code can dial: the requested
    host for a wildcard (the dynamic forward proxy), the original destination for
    ``resolution: NONE`` and ``ALLOW_ANY``, and every host-name endpoint resolved by
    ``egress.dns`` with its TTL (a failure is 503 ``UF``). A cluster of IP endpoints
    known to the Snapshot keeps the gateway's lean path. TLS origination, retries,
    timeouts and pools are the gateway's (``gateway.traffic``), reached with the
    cluster built here. A ``CONNECT`` gets a TCP connection to the chosen endpoint,
    ``200 Connection established`` and a byte splice for as long as both sides keep it.

Every request and tunnel goes through the gateway's pipeline, so the access log, the
Istio metrics (``destination_service`` is the external host) and the security and
rate-limit stages apply to egress as they do to ingress.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import sys
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from gateway.errors import (
    BadRequest,
    ErrorSource,
    GatewayError,
    RouteNotFound,
    UpstreamConnectFailure,
)
from gateway.routing.match import pick_destination
from gateway.routing.table import (
    Cluster,
    Endpoint,
    Forward,
    Origin,
    Route,
    SNIRoute,
    WeightedCluster,
)
from gateway.stages import RequestContext, RouteStage, UpstreamStage
from gateway.upstream.pool import UpstreamPools
from gateway.upstream.websocket import splice

from .dns import ResolutionFailed, Resolver
from .registry import EgressRegistry, EgressSettings, ExternalService, split_authority

__all__ = [
    "BLACKHOLE_CLUSTER",
    "DnsResolutionFailure",
    "Egress",
    "EgressRefused",
    "EgressRouteStage",
    "EgressUpstreamStage",
    "Held",
]

BLACKHOLE_CLUSTER = "BlackHoleCluster"  # Istio's name for where refused traffic goes
_MAX_CACHED = 4096
_ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

log = logging.getLogger("meshgate.egress")


def _setup_log() -> None:
    """Egress decisions worth an operator's eye go to stderr, one line each."""
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("meshgate: egress: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


class EgressRefused(GatewayError):
    """The destination is not in the registry and the policy is REGISTRY_ONLY."""

    status = 502
    flag = "NR"
    body = "destination not allowed by the egress policy"

    source = ErrorSource.DOWNSTREAM


class DnsResolutionFailure(UpstreamConnectFailure):
    """An endpoint's name did not resolve: no address to connect to (503 UF)."""

    body = "upstream connect error: DNS resolution failed"
    retryable = False


@dataclass(frozen=True, slots=True)
class _Target:
    """What a registry-made route forwards to: ``host:port``, under ``service``."""

    host: str  # the requested host (concrete, never a wildcard)
    port: int  # the requested port
    service: ExternalService | None  # None: ALLOW_ANY to a host nobody declared


class Egress:
    """One worker's egress state: the resolver and what it decided per Snapshot."""

    def __init__(self, settings: EgressSettings, pools: UpstreamPools) -> None:
        _setup_log()
        self.settings = settings
        self.pools = pools
        self.resolver = Resolver(
            settings.dns_servers,
            settings.dns_timeout_s,
            settings.dns_min_ttl_s,
            hosts_file=settings.hosts_file,
        )
        self._snapshot: Any = None
        # cluster name -> target, for the routes made here (per Snapshot).
        self._targets: dict[str, _Target] = {}
        # (host, port, connect) -> Route made from the registry (per Snapshot).
        self._routes: dict[tuple[str, int, bool], Route] = {}
        # cluster name -> (cluster before resolution, addresses, cluster dialled).
        self._clusters: dict[str, tuple[Cluster, tuple[tuple[str, ...], ...], Cluster]] = {}
        self.refused = 0
        self._rnd = random.Random()

    def _adopt(self, snapshot: Any) -> EgressRegistry:
        registry = getattr(snapshot, "egress", None)
        if registry is None:
            raise RouteNotFound("no egress registry in this configuration")
        if snapshot is not self._snapshot:
            # A reload: what was decided for the old configuration is dropped.
            self._snapshot = snapshot
            self._targets.clear()
            self._routes.clear()
            self._clusters.clear()
        return registry

    # -- decisions ---------------------------------------------------------------------

    def refuse(self, ctx: RequestContext, destination: str, why: str) -> EgressRefused:
        ctx.upstream_cluster = BLACKHOLE_CLUSTER
        self.refused += 1
        caller = ctx.xff or ctx.head.peer
        log.info("refused %s %s -> %s: %s", ctx.head.method, caller, destination, why)
        return EgressRefused(f"{destination}: {why}")

    def registry_route(self, ctx: RequestContext, connect: bool) -> Route:
        """The route for a request (or CONNECT) no VirtualService routes."""
        registry = self._adopt(ctx.snapshot)
        head = ctx.head
        default_port = 443 if connect or head.scheme == "https" else 80
        host, port = split_authority(head.authority, default_port)
        if not host or port is None:
            raise self.refuse(ctx, head.authority or "-", "no host:port to go to")
        key = (host, port, connect)
        route = self._routes.get(key)
        if route is not None:
            return route
        destination = f"{host}:{port}"
        service = registry.lookup(host)
        why = ""
        if service is None:
            why = "no ServiceEntry for this host (outboundTrafficPolicy REGISTRY_ONLY)"
        elif not service.external:
            why = f"{service.origin.ref} is MESH_INTERNAL: reached only by a route"
        elif port not in service.ports:
            declared = ", ".join(str(p) for p in sorted(service.ports)) or "none"
            why = f"port {port} not declared by {service.origin.ref} ({declared})"
        if why:
            if not registry.allow_any:
                raise self.refuse(ctx, destination, why)
            service = None  # ALLOW_ANY: straight to what the client asked for
        origin = (
            service.origin
            if service is not None
            else Origin("OutboundTrafficPolicy", "-", "ALLOW_ANY")
        )
        # Named after the host asked for, not the entry's: a wildcard or a CIDR block
        # covers many destinations, each its own cluster (SNI, endpoints, metrics).
        name = f"outbound|{port}||{host}"
        self._targets[name] = _Target(host, port, service)
        route_name = "connect" if connect else "registry"
        ratelimit = None
        if registry.ratelimits:
            from ratelimit.policy import limits_for_route

            ratelimit = limits_for_route(registry.ratelimits, host, route_name)
        route = Route(
            name=route_name,
            origin=origin,
            ratelimit=ratelimit,
            matches=(),
            action=Forward(
                destinations=(WeightedCluster(cluster=name, weight=100),),
                total_weight=100,
                cumulative=(100,),
            ),
        )
        if len(self._routes) >= _MAX_CACHED:
            self._routes.clear()
        self._routes[key] = route
        return route

    def _base_cluster(self, ctx: RequestContext, registry: EgressRegistry, name: str) -> Cluster:
        """The cluster a route names, made dialable in principle (no I/O yet): a
        concrete host for a wildcard, the original destination where the registry
        has no endpoints. Raises EgressRefused for a host the policy does not allow."""
        compiler = registry.clusters
        assert compiler is not None
        target = self._targets.get(name)
        snapshot_cluster = ctx.snapshot.clusters.get(name)  # type: ignore[union-attr]
        if target is None and snapshot_cluster is not None:
            host, port = snapshot_cluster.host, snapshot_cluster.port
            if host.startswith("*"):
                # A VirtualService route to a wildcard ServiceEntry host: the
                # requested name is the one to dial (the dynamic forward proxy).
                requested, _ = split_authority(ctx.head.authority, port)
                if not requested.endswith(host[1:]) or len(requested) <= len(host) - 1:
                    raise self.refuse(ctx, f"{requested}:{port}", f"not covered by {host}")
                host = requested
            service = registry.lookup(host)
            if service is None and not registry.allow_any:
                raise self.refuse(
                    ctx,
                    f"{host}:{port}",
                    "route destination has no ServiceEntry (outboundTrafficPolicy REGISTRY_ONLY)",
                )
            if host == snapshot_cluster.host and snapshot_cluster.endpoints:
                return snapshot_cluster
            target = _Target(host, port, service)
            name = f"outbound|{port}||{host}"
        if target is None:
            raise RouteNotFound(f"no cluster {name}")
        service = target.service
        resource = service.resource if service is not None else None
        cluster = compiler.cluster(target.host, target.port, resource)
        if cluster.name != name:
            cluster = dataclasses.replace(cluster, name=name)
        if not cluster.endpoints:
            # resolution NONE, a DYNAMIC_DNS wildcard, ALLOW_ANY: the destination the
            # client asked for, resolved below when it is a name.
            cluster = dataclasses.replace(cluster, endpoints=(Endpoint(target.host, target.port),))
        return cluster

    @staticmethod
    def _key(ctx: RequestContext, name: str) -> str:
        """The cache key of a cluster: a wildcard one is dialled per requested host."""
        if "|*" not in name:
            return name
        return f"{name}>{split_authority(ctx.head.authority, 0)[0]}"

    def cluster_now(self, ctx: RequestContext, name: str) -> Cluster | None:
        """The dialable cluster when nothing needs to be awaited, else None."""
        if ctx.snapshot is not self._snapshot:
            return None
        entry = self._clusters.get(self._key(ctx, name))
        if entry is None:
            return None
        base, signature, resolved = entry
        cached = self.resolver.cached
        for endpoint, addresses in zip(base.endpoints, signature, strict=True):
            if cached(endpoint.address) != addresses:
                return None
        return resolved

    async def cluster_for(self, ctx: RequestContext, name: str) -> Cluster:
        """The cluster ``name`` with every host-name endpoint resolved (DNS, TTL)."""
        registry = self._adopt(ctx.snapshot)
        key = self._key(ctx, name)
        entry = self._clusters.get(key)
        base = entry[0] if entry is not None else self._base_cluster(ctx, registry, name)
        signature: list[tuple[str, ...]] = []
        endpoints: list[Endpoint] = []
        for endpoint in base.endpoints:
            try:
                addresses = await self.resolver.resolve(endpoint.address)
            except ResolutionFailed as exc:
                ctx.upstream_cluster = base.name
                log.info(
                    "DNS failed for %s %s -> %s: %s",
                    ctx.head.method,
                    ctx.xff or ctx.head.peer,
                    base.name,
                    exc,
                )
                raise DnsResolutionFailure(str(exc)) from exc
            signature.append(addresses)
            endpoints.extend(dataclasses.replace(endpoint, address=a) for a in addresses)
        sig = tuple(signature)
        if entry is not None and entry[1] == sig:
            return entry[2]
        unchanged = all(
            len(a) == 1 and a[0] == e.address for a, e in zip(sig, base.endpoints, strict=True)
        )
        resolved = base if unchanged else dataclasses.replace(base, endpoints=tuple(endpoints))
        if len(self._clusters) >= _MAX_CACHED:
            self._clusters.clear()
        self._clusters[key] = (base, sig, resolved)
        return resolved

    def pick_weighted(self, route: SNIRoute) -> WeightedCluster:
        """A destination of a weighted ``tls[]`` route, by weight."""
        return pick_destination(route, self._rnd.random())  # type: ignore[arg-type]

    async def connect(
        self, ctx: RequestContext, address: str, port: int
    ) -> tuple[asyncio.Transport, Held]:
        """A plain TCP connection for a tunnel, within the connect timeout; what the
        upstream sends before the splice is kept in the ``Held`` protocol."""
        label = f"{address}:{port}"
        loop = asyncio.get_running_loop()
        started = perf_counter()
        try:
            async with asyncio.timeout(self.pools.connect_timeout_s):
                up, held = await loop.create_connection(Held, address, port)
        except TimeoutError as exc:
            raise UpstreamConnectFailure(f"connect to {label} timed out") from exc
        except OSError as exc:
            log.info("tunnel %s -> %s failed: %s", ctx.xff or ctx.head.peer, label, exc)
            raise UpstreamConnectFailure(f"connect to {label}: {exc}") from exc
        ctx.upstream_ms = (perf_counter() - started) * 1000.0
        return up, held


class EgressRouteStage(RouteStage):
    """VirtualService routes first; what they do not route, the registry decides."""

    def __init__(self, egress: Egress) -> None:
        super().__init__()
        self.egress = egress

    def on_request(self, ctx: RequestContext) -> None:
        if ctx.head.method == "CONNECT":
            if getattr(ctx.stream, "tunnel", None) is None:
                # HTTP/2 and HTTP/3 CONNECT (RFC 9113 8.5) is not served: their
                # streams cannot be handed over as a byte tunnel here.
                raise BadRequest(f"CONNECT over HTTP/{ctx.head.http_version} is not served")
            ctx.route = self.egress.registry_route(ctx, connect=True)
            return None
        try:
            return RouteStage.on_request(self, ctx)
        except RouteNotFound:
            ctx.route = self.egress.registry_route(ctx, connect=False)
            return None


class EgressUpstreamStage(UpstreamStage):
    """Dials what the egress routes name: resolved, dynamic, or tunnelled."""

    def __init__(self, pools: UpstreamPools, egress: Egress) -> None:
        super().__init__(pools)
        self.egress = egress

    async def forward(self, ctx: RequestContext) -> None:
        destination = ctx.destination
        assert destination is not None and ctx.snapshot is not None
        name = destination.cluster
        egress = self.egress
        cluster = egress.cluster_now(ctx, name)
        if cluster is None:
            cluster = await egress.cluster_for(ctx, name)
        try:
            if ctx.head.method == "CONNECT":
                await self._tunnel(ctx, cluster)
            elif cluster is ctx.snapshot.clusters.get(name):
                await UpstreamStage.forward(self, ctx)
            else:
                await self.traffic.forward(ctx, cluster)
        except UpstreamConnectFailure as exc:
            # The TLS origination failures (wrong CA, wrong SAN) land here too.
            log.info(
                "%s %s -> %s failed (%s): %s",
                ctx.head.method,
                ctx.xff or ctx.head.peer,
                cluster.name,
                exc.flag,
                exc.detail,
            )
            raise

    async def _tunnel(self, ctx: RequestContext, cluster: Cluster) -> None:
        """CONNECT: a TCP connection of its own to one endpoint, then a splice."""
        endpoint = self.pools.pick_endpoint(cluster)
        ctx.upstream_cluster = cluster.name
        ctx.upstream_host = f"{endpoint.address}:{endpoint.port}"
        up, held = await self.egress.connect(ctx, endpoint.address, endpoint.port)
        try:
            down, down_rest = ctx.stream.take_over()  # type: ignore[attr-defined]
        except BaseException:
            up.close()
            raise
        ctx.status = 200
        ctx.response_started = True
        down.write(_ESTABLISHED)
        if held.closed:
            # The upstream hung up before the splice began: nothing to carry.
            down.write(bytes(held.buffer))
            down.close()
            ctx.bytes_sent += len(held.buffer)
            return
        sent_up, sent_down = await splice(down, down_rest, up, bytes(held.buffer))
        ctx.bytes_received += sent_up
        ctx.bytes_sent += sent_down


class Held(asyncio.Protocol):
    """An upstream connection waiting for the splice: keeps what arrives early."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.closed = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.transport is not None:
            self.transport.pause_reading()  # bounded: one read's worth at most

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
