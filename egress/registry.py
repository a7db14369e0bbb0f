"""The egress registry: which external hosts traffic may leave the mesh for.

Compiled once per configuration (``attach_egress``, called by the runtime after
``gateway.routing.compile_snapshot``) from the ServiceEntry resources the gateway can
see, and stored on the Snapshot, so a reload swaps it with everything else. It owns:

- the outbound traffic policy: ``REGISTRY_ONLY`` (only hosts a ServiceEntry declares)
  or ``ALLOW_ANY`` (anything, the registry still choosing endpoints where it knows
  the host);
- host lookup: exact hosts, then the most specific ``*.suffix`` wildcard, then the
  CIDR blocks of ``spec.addresses`` for IP literals; each with its declared ports;
- ``exportTo``: a ServiceEntry exported only to other namespaces is invisible here;
- a ``ClusterCompiler`` (``gateway.routing``) that turns a host met at request time
  into a cluster with the DestinationRule that covers it, so TLS origination and the
  rest of the traffic policy are the routing engine's, not a copy.

No I/O here: resolving names is ``egress.dns``'s, using the result ``egress.forward``'s.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.config.errors import Model
from gateway.config.hosts import expand_host
from gateway.config.resources import Resource, ServiceEntryPort, ServiceEntrySpec
from gateway.routing.compile import ClusterCompiler
from gateway.routing.dump import snapshot_content_hash
from gateway.routing.table import Origin, Snapshot

__all__ = [
    "ALLOW_ANY",
    "POLICIES",
    "REGISTRY_ONLY",
    "EgressRegistry",
    "EgressSettings",
    "ExternalService",
    "attach_egress",
    "split_authority",
]

REGISTRY_ONLY = "REGISTRY_ONLY"
ALLOW_ANY = "ALLOW_ANY"
POLICIES = (REGISTRY_ONLY, ALLOW_ANY)


@dataclass(frozen=True, slots=True)
class EgressSettings:
    """How this process acts as an egress gateway (``meshgate egress`` flags)."""

    outbound_traffic_policy: str = REGISTRY_ONLY
    # DNS servers as "address" or "address:port"; empty: those of /etc/resolv.conf.
    dns_servers: tuple[str, ...] = ()
    dns_timeout_s: float = 5.0
    # A name whose answer says TTL 0 is looked up again on every request; this floor
    # (0: none) keeps a burst from turning into a burst of queries.
    dns_min_ttl_s: float = 0.0
    # Names answered from this file before DNS (as Envoy does); "" for none.
    hosts_file: str = "/etc/hosts"


@dataclass(frozen=True, slots=True)
class ExternalService:
    """One host of one ServiceEntry, as the egress gateway looks it up."""

    host: str  # as declared, lower-case: "api.example.com" or "*.example.com"
    origin: Origin
    location: str  # MESH_EXTERNAL | MESH_INTERNAL
    resolution: str  # NONE | STATIC | DNS | DNS_ROUND_ROBIN | DYNAMIC_DNS
    ports: Mapping[int, ServiceEntryPort]
    resource: Resource = field(compare=False, repr=False)

    @property
    def external(self) -> bool:
        # Istio's default location is MESH_EXTERNAL.
        return self.location != "MESH_INTERNAL"

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "serviceEntry": self.origin.ref,
            "location": self.location,
            "resolution": self.resolution,
            "ports": [
                {
                    "number": number,
                    "name": port.name,
                    **({"protocol": port.protocol.upper()} if port.protocol else {}),
                    **({"targetPort": port.target_port} if port.target_port else {}),
                }
                for number, port in sorted(self.ports.items())
            ],
        }


def split_authority(authority: str, default_port: int) -> tuple[str, int | None]:
    """``Host:8443`` -> ("host", 8443); no port -> ``default_port``; a port that is not
    a number -> None. IPv6 literals keep no brackets."""
    if authority.startswith("["):
        end = authority.find("]")
        host = authority[1:end] if end != -1 else authority[1:]
        rest = authority[end + 1 :] if end != -1 else ""
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep or ":" in host:  # no port, or a bare IPv6 address
            host, port_text = authority, ""
    host = host.lower().rstrip(".")
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return host, None
    return host, int(port_text)


@dataclass(frozen=True, slots=True)
class EgressRegistry:
    """The external hosts this gateway may forward to, and what to do with the rest."""

    policy: str
    exact: Mapping[str, ExternalService]
    wildcard: Mapping[str, ExternalService]  # keyed by suffix with its dot: ".example.com"
    networks: tuple[tuple[Any, ExternalService], ...]  # (ip_network, service)
    settings: EgressSettings = field(compare=False, repr=False)
    clusters: ClusterCompiler | None = field(default=None, compare=False, repr=False)
    # ratelimit.policy.Policy of every RateLimitPolicy selecting this gateway: the
    # routes the registry makes are limited by host as VirtualService routes are.
    ratelimits: tuple[Any, ...] = field(default=(), compare=False, repr=False)

    @property
    def allow_any(self) -> bool:
        return self.policy == ALLOW_ANY

    def lookup(self, host: str) -> ExternalService | None:
        """The ServiceEntry host covering ``host`` (lower-case, no port): exact first,
        then the longest wildcard, then a CIDR block of ``addresses`` for an IP."""
        service = self.exact.get(host)
        if service is not None:
            return service
        wildcard = self.wildcard
        if wildcard:
            dot = host.find(".", 1)
            while dot != -1:
                service = wildcard.get(host[dot:])
                if service is not None:
                    return service
                dot = host.find(".", dot + 1)
        if self.networks:
            try:
                address = ipaddress.ip_address(host)
            except ValueError:
                return None
            for network, candidate in self.networks:
                if address.version == network.version and address in network:
                    return candidate
        return None

    def to_dict(self) -> dict[str, Any]:
        services = [*self.exact.values(), *self.wildcard.values()]
        services += [service for _, service in self.networks if service not in services]
        return {
            "outboundTrafficPolicy": self.policy,
            "hosts": [s.to_dict() for s in sorted(services, key=lambda s: (s.host, s.origin.ref))],
            "addresses": [f"{network} -> {s.origin.ref}" for network, s in self.networks],
        }


def _exported_to(resource: Resource, namespace: str) -> bool:
    """Istio's exportTo: empty or "*" is everyone, "." the resource's own namespace."""
    spec: ServiceEntrySpec = resource.spec
    targets = spec.export_to
    if not targets or "*" in targets:
        return True
    own = resource.metadata.namespace
    return any(t == namespace or (t == "." and own == namespace) for t in targets)


def compile_registry(
    model: Model,
    settings: EgressSettings,
    namespace: str,
    gateway_labels: Mapping[str, str] | None = None,
) -> EgressRegistry:
    """The registry of every ServiceEntry visible from ``namespace``.

    The first ServiceEntry (load order) to declare a host owns it, as in the routing
    compiler, so a host's endpoints and its registry entry always agree."""
    exact: dict[str, ExternalService] = {}
    wildcard: dict[str, ExternalService] = {}
    networks: list[tuple[Any, ExternalService]] = []
    for resource in model.of_kind("ServiceEntry"):
        if not _exported_to(resource, namespace):
            continue
        spec: ServiceEntrySpec = resource.spec
        origin = Origin(
            "ServiceEntry", resource.metadata.namespace, resource.metadata.name, resource.source
        )
        ports = {port.number: port for port in spec.ports}
        first: ExternalService | None = None
        for raw in spec.hosts:
            host = expand_host(raw, resource.metadata.namespace)
            service = ExternalService(
                host=host,
                origin=origin,
                location=(spec.location or "MESH_EXTERNAL").upper(),
                resolution=(spec.resolution or "NONE").upper(),
                ports=ports,
                resource=resource,
            )
            first = first or service
            if host.startswith("*."):
                wildcard.setdefault(host[1:], service)
            else:
                exact.setdefault(host, service)
        for text in spec.addresses:
            if first is None:
                break
            try:
                networks.append((ipaddress.ip_network(text, strict=False), first))
            except ValueError:
                continue  # the validator reported it
    # Most specific block first, so a /32 inside a /24 of another entry wins.
    networks.sort(key=lambda item: -item[0].prefixlen)
    ratelimits: tuple[Any, ...] = ()
    if model.of_kind("RateLimitPolicy"):
        from ratelimit.policy import compile_policies

        ratelimits = compile_policies(model.of_kind("RateLimitPolicy"), gateway_labels or {})
    return EgressRegistry(
        policy=settings.outbound_traffic_policy,
        exact=exact,
        wildcard=wildcard,
        networks=tuple(networks),
        settings=settings,
        clusters=ClusterCompiler(model),
        ratelimits=ratelimits,
    )


def attach_egress(
    snapshot: Snapshot, model: Model, settings: EgressSettings, namespace: str
) -> Snapshot:
    """``snapshot`` with its egress registry, and a version that covers it."""
    registry = compile_registry(model, settings, namespace, snapshot.gateway_labels)
    snapshot = dataclasses.replace(snapshot, egress=registry)
    return dataclasses.replace(snapshot, version=snapshot_content_hash(snapshot))
