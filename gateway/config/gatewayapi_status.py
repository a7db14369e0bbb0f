"""Which Gateway API routes attach where, and the status a controller would report.

    bind_gateway_api(model, classes) -> Binding    pure: resources in, decisions out
    status_to_dict(binding)          -> the status of every object, Kubernetes-shaped
    status_warnings(binding)         -> the False conditions as ConfigError warnings

One pass decides everything the Gateway API leaves to a controller: the Gateways
meshgate serves (``gatewayClassName`` in ``--gateway-class``, and a GatewayClass of
that name, if any, naming meshgate's controller), each listener's validity, which
listeners every route attaches to and under which hostnames (the intersection of the
listener's hostname and the route's), and whether each backend and certificate
reference resolves (ReferenceGrant for other namespaces). The translator
(``gateway.routing.gatewayapi``) compiles from the same ``Binding``, so what the status
says and what the data plane does cannot disagree.

Outside Kubernetes there are no Service objects: a backendRef to Service ``name`` in
namespace ``ns`` is the host ``name.ns.svc.cluster.local``, found in the ServiceEntry
registry exactly as a VirtualService destination is.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import gatewayapi as gw
from .errors import ConfigError, Model
from .hosts import CLUSTER_DOMAIN, expand_host, host_matches, hosts_intersection
from .resources import Resource

__all__ = [
    "Attachment",
    "Backend",
    "Binding",
    "Condition",
    "GatewayBinding",
    "ListenerBinding",
    "RouteBinding",
    "bind_gateway_api",
    "route_age_key",
    "status_to_dict",
    "status_warnings",
]

ROUTE_KINDS = ("HTTPRoute", "GRPCRoute")
_SERVED_PROTOCOLS = ("HTTP", "HTTPS")


@dataclass(frozen=True, slots=True)
class Condition:
    """A status condition; ``path`` is the field a warning about it points at."""

    type: str
    status: bool
    reason: str
    message: str = ""
    path: str = field(default="", compare=False)

    def to_dict(self) -> dict[str, Any]:
        out = {"type": self.type, "status": "True" if self.status else "False"}
        out["reason"] = self.reason
        if self.message:
            out["message"] = self.message
        return out


@dataclass(slots=True)
class ListenerBinding:
    gateway: Resource
    index: int
    spec: gw.Listener
    supported_kinds: list[str] = field(default_factory=list)
    conditions: list[Condition] = field(default_factory=list)
    attached_routes: int = 0
    # Secret names (credentials-dir folders) of an HTTPS listener whose refs resolve.
    certificates: list[str] = field(default_factory=list)
    usable: bool = True  # accepted and programmed: the data plane serves it

    @property
    def path(self) -> str:
        return f"spec.listeners[{self.index}]"


@dataclass(slots=True)
class GatewayBinding:
    resource: Resource
    listeners: list[ListenerBinding]
    conditions: list[Condition] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Backend:
    """A resolved backendRef: the registry host and port, or why it cannot be used."""

    host: str
    port: int
    problem: Condition | None = None


@dataclass(frozen=True, slots=True)
class Attachment:
    """A route attached to a listener, with the hostnames it serves there ("*": any)."""

    route: Resource
    listener: ListenerBinding
    domains: tuple[str, ...]


@dataclass(slots=True)
class RouteBinding:
    resource: Resource
    parents: list[tuple[int, gw.ParentReference, list[Condition]]] = field(default_factory=list)
    attachments: list[Attachment] = field(default_factory=list)
    # (rule index, backend index) -> Backend; mirrors under ("mirror", rule, filter).
    backends: dict[tuple[Any, ...], Backend] = field(default_factory=dict)
    problems: list[Condition] = field(default_factory=list)  # one per unusable reference


@dataclass(slots=True)
class Binding:
    classes: list[tuple[Resource, list[Condition]]] = field(default_factory=list)
    gateways: list[GatewayBinding] = field(default_factory=list)
    routes: list[RouteBinding] = field(default_factory=list)
    # Load position of every resource, for the "oldest first" tie-break.
    positions: dict[int, int] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def _parse_timestamp(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        stamp = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=datetime.UTC)
    return stamp


def route_age_key(resource: Resource, position: int) -> tuple[Any, ...]:
    """Oldest first. Resources without a ``creationTimestamp`` were not created by a
    cluster yet: they count as newer than every stamped one, and among themselves the
    earlier in the loaded files is the older."""
    stamp = _parse_timestamp(resource.metadata.creation_timestamp)
    if stamp is None:
        return (1, position)
    return (0, stamp.timestamp())  # equal stamps: namespace/name decides, not position


class _Grants:
    """ReferenceGrants by the namespace they live in (the namespace granting access)."""

    def __init__(self, model: Model) -> None:
        self.by_namespace: dict[str, list[gw.ReferenceGrantSpec]] = {}
        for res in model.gateway_api("ReferenceGrant"):
            self.by_namespace.setdefault(res.metadata.namespace, []).append(res.spec)

    def allows(
        self, from_kind: str, from_ns: str, to_group: str, to_kind: str, to_ns: str, to_name: str
    ) -> bool:
        for spec in self.by_namespace.get(to_ns, ()):
            if not any(
                f.group == gw.GATEWAY_API_GROUP and f.kind == from_kind and f.namespace == from_ns
                for f in spec.from_
            ):
                continue
            for t in spec.to:
                if t.group == to_group and t.kind == to_kind and t.name in (None, to_name):
                    return True
        return False


def _intersect(listener_host: str | None, route_hosts: Sequence[str]) -> tuple[str, ...]:
    """The hostnames a route serves on a listener; empty when they do not intersect.

    As the spec describes: no hostname on either side means the other side's; both
    set, each route hostname is kept where the listener's covers it, or the listener's
    where the route's covers that (a wildcard covers any depth of labels, never the
    bare domain)."""
    if listener_host is None:
        return tuple(dict.fromkeys(h.lower() for h in route_hosts)) or ("*",)
    listener_host = listener_host.lower()
    if not route_hosts:
        return (listener_host,)
    out: list[str] = []
    for host in route_hosts:
        common = hosts_intersection(listener_host, host.lower())
        if common is not None and common not in out:
            out.append(common)
    return tuple(out)


def _specificity(hostname: str | None) -> tuple[int, int]:
    """How specific a listener hostname is: none < wildcard (longer is more) < exact."""
    if hostname is None:
        return (0, 0)
    if hostname.startswith("*."):
        return (1, len(hostname))
    return (2, len(hostname))


def _namespace_allowed(listener: ListenerBinding, route_ns: str) -> bool:
    allowed = listener.spec.allowed_routes
    source = "Same"
    if allowed is not None and allowed.namespaces is not None:
        source = allowed.namespaces.from_ or "Same"
    if source == "All":
        return True
    if source == "Same":
        return route_ns == listener.gateway.metadata.namespace
    return False  # Selector: no Namespace labels outside Kubernetes (documented)


# --------------------------------------------------------------------------- binding


class _Binder:
    def __init__(
        self, model: Model, classes: Iterable[str], credentials_dir: str | None = None
    ) -> None:
        self.model = model
        self.classes = set(classes)
        self.credentials_dir = credentials_dir
        self.by_port: dict[int, list[ListenerBinding]] = {}  # usable listeners
        self.grants = _Grants(model)
        self.services: dict[str, Resource] = {}
        for se in model.of_kind("ServiceEntry"):
            for host in se.spec.hosts:
                self.services.setdefault(expand_host(host, se.metadata.namespace), se)
        self.binding = Binding(positions={id(r): i for i, r in enumerate(model.resources)})

    def run(self) -> Binding:
        ours: dict[str, bool] = {}
        for res in self.model.gateway_api("GatewayClass"):
            spec: gw.GatewayClassSpec = res.spec
            mine = spec.controller_name == gw.CONTROLLER_NAME
            ours[res.metadata.name] = mine
            # Another meshgate (another --gateway-class) may serve a class of ours.
            if mine and res.metadata.name in self.classes:
                accepted = Condition("Accepted", True, "Accepted", "handled by meshgate")
                self.binding.classes.append((res, [accepted]))
        for res in self.model.gateway_api("Gateway"):
            name = res.spec.gateway_class_name
            # No GatewayClass object at all is fine outside Kubernetes; one naming
            # another controller means the Gateway belongs to someone else.
            if name in self.classes and ours.get(name, True):
                self.binding.gateways.append(self._gateway(res))
        self._port_conflicts()
        for g in self.binding.gateways:
            for lb in g.listeners:
                if lb.usable:
                    self.by_port.setdefault(lb.spec.port, []).append(lb)
        routes = [r for kind in ROUTE_KINDS for r in self.model.gateway_api(kind)]
        routes.sort(key=lambda r: self.binding.positions[id(r)])
        for res in routes:
            self.binding.routes.append(self._route(res))
        for g in self.binding.gateways:
            self._finish_gateway(g)
        return self.binding

    # ----------------------------------------------------------------- gateways

    def _gateway(self, res: Resource) -> GatewayBinding:
        spec: gw.GatewaySpec = res.spec
        listeners = [ListenerBinding(res, i, spec_l) for i, spec_l in enumerate(spec.listeners)]
        by_port: dict[int, list[ListenerBinding]] = {}
        for lb in listeners:
            by_port.setdefault(lb.spec.port, []).append(lb)
        for lb in listeners:
            self._listener(lb, by_port[lb.spec.port])
        return GatewayBinding(res, listeners)

    def _port_conflicts(self) -> None:
        """Gateways served by one process share its ports: the first Gateway (load
        order) to serve a port decides its protocol, and a listener of a later Gateway
        with another protocol on that port is reported and not served."""
        taken: dict[int, tuple[str, Resource]] = {}
        for g in self.binding.gateways:
            for lb in g.listeners:
                if not lb.usable:
                    continue
                port, protocol = lb.spec.port, lb.spec.protocol
                first = taken.setdefault(port, (protocol, g.resource))
                if first[0] == protocol:
                    continue
                owner = first[1]
                message = (
                    f"port {port} is already served as {first[0]} by Gateway "
                    f"{owner.metadata.namespace}/{owner.metadata.name}"
                )
                lb.usable = False
                lb.conditions = [
                    lb.conditions[0],
                    Condition(
                        "Programmed", False, "Invalid", "the listener is not served", lb.path
                    ),
                    lb.conditions[2],
                    Condition(
                        "Conflicted", True, "ProtocolConflict", message, f"{lb.path}.protocol"
                    ),
                ]

    def _isolate(self, lb: ListenerBinding, domains: tuple[str, ...]) -> tuple[str, ...]:
        """The domains a listener keeps once more specific listeners of its port take
        theirs: a request goes to the listener whose hostname matches it most
        specifically, so a route attached through ``*.example.com`` does not serve
        ``a.example.com`` when a listener for ``a.example.com`` exists on the port."""
        own = _specificity(lb.spec.hostname)
        rivals = [
            other.spec.hostname.lower()
            for other in self.by_port.get(lb.spec.port, ())
            if other is not lb
            and other.spec.hostname is not None
            and _specificity(other.spec.hostname) > own
        ]
        if not rivals:
            return domains
        return tuple(d for d in domains if not any(host_matches(rival, d) for rival in rivals))

    def _listener(self, lb: ListenerBinding, same_port: list[ListenerBinding]) -> None:
        spec = lb.spec
        path = lb.path
        accepted = Condition("Accepted", True, "Accepted", path=path)
        resolved = Condition("ResolvedRefs", True, "ResolvedRefs", path=path)
        conflicted = Condition("Conflicted", False, "NoConflicts", path=path)
        if spec.protocol not in _SERVED_PROTOCOLS:
            accepted = Condition(
                "Accepted",
                False,
                "UnsupportedProtocol",
                f"protocol {spec.protocol} is not served; meshgate serves HTTP and HTTPS",
                path=f"{path}.protocol",
            )
        elif spec.tls is not None and (spec.tls.mode or "Terminate") == "Passthrough":
            accepted = Condition(
                "Accepted",
                False,
                "UnsupportedValue",
                "tls.mode Passthrough is not supported on an HTTPS listener",
                path=f"{path}.tls.mode",
            )
        others = [o for o in same_port if o is not lb]
        if any(o.spec.protocol != spec.protocol for o in others):
            conflicted = Condition(
                "Conflicted",
                True,
                "ProtocolConflict",
                f"another listener on port {spec.port} uses a different protocol",
                path=f"{path}.protocol",
            )
        elif any((o.spec.hostname or "") == (spec.hostname or "") for o in others):
            conflicted = Condition(
                "Conflicted",
                True,
                "HostnameConflict",
                f"another listener on port {spec.port} has the same hostname",
                path=f"{path}.hostname",
            )
        # Route kinds: HTTPRoute and GRPCRoute by default; a listed kind we do not
        # serve is reported and left out.
        kinds: list[str] = []
        allowed = spec.allowed_routes
        if allowed is not None and allowed.kinds:
            bad = []
            for k, entry in enumerate(allowed.kinds):
                group = gw.GATEWAY_API_GROUP if entry.group is None else entry.group
                if group == gw.GATEWAY_API_GROUP and entry.kind in ROUTE_KINDS:
                    if entry.kind not in kinds:
                        kinds.append(entry.kind)
                else:
                    bad.append((k, entry.kind))
            if bad:
                k, _kind = bad[0]
                resolved = Condition(
                    "ResolvedRefs",
                    False,
                    "InvalidRouteKinds",
                    f"route kind {', '.join(b[1] for b in bad)} is not supported "
                    "(HTTPRoute and GRPCRoute are)",
                    path=f"{path}.allowedRoutes.kinds[{k}]",
                )
        else:
            kinds = list(ROUTE_KINDS)
        if accepted.status and spec.protocol == "HTTPS" and spec.tls is not None:
            resolved = self._certificates(lb, resolved)
        lb.supported_kinds = kinds if accepted.status else []
        lb.usable = accepted.status and not conflicted.status
        if spec.protocol == "HTTPS" and not lb.certificates:
            lb.usable = False
        if lb.usable and resolved.reason == "InvalidCertificateRef" and lb.certificates:
            # Bound, but no certificate to present until the Secret's files appear.
            programmed = Condition(
                "Programmed", False, "Invalid", "waiting for the Secret's files", path=path
            )
        elif lb.usable:
            programmed = Condition("Programmed", True, "Programmed", path=path)
        else:
            programmed = Condition(
                "Programmed", False, "Invalid", "the listener is not served", path=path
            )
        lb.conditions = [accepted, programmed, resolved, conflicted]

    def _certificates(self, lb: ListenerBinding, resolved: Condition) -> Condition:
        gw_ns = lb.gateway.metadata.namespace
        assert lb.spec.tls is not None
        for c, ref in enumerate(lb.spec.tls.certificate_refs):
            path = f"{lb.path}.tls.certificateRefs[{c}]"
            group = ref.group or ""
            kind = ref.kind or "Secret"
            ns = ref.namespace or gw_ns
            if group != "" or kind != "Secret":
                resolved = Condition(
                    "ResolvedRefs",
                    False,
                    "InvalidCertificateRef",
                    f"{kind} is not a Secret; certificates come from Secrets "
                    "(folders of --credentials-dir)",
                    path=path,
                )
                continue
            if ns != gw_ns and not self.grants.allows("Gateway", gw_ns, "", "Secret", ns, ref.name):
                resolved = Condition(
                    "ResolvedRefs",
                    False,
                    "RefNotPermitted",
                    f"no ReferenceGrant in namespace {ns} lets Gateways of {gw_ns} use "
                    f"Secret {ref.name}",
                    path=path,
                )
                continue
            if self.credentials_dir is not None and not self._secret_exists(ref.name):
                # Reported, but still served: the TLS layer loads the Secret once its
                # files appear, as it does for an Istio credentialName.
                resolved = Condition(
                    "ResolvedRefs",
                    False,
                    "InvalidCertificateRef",
                    f"Secret {ns}/{ref.name} not found: no {ref.name}/tls.crt and "
                    f"tls.key in the credentials directory",
                    path=path,
                )
            lb.certificates.append(ref.name)
        return resolved

    def _secret_exists(self, name: str) -> bool:
        assert self.credentials_dir is not None
        folder = os.path.join(self.credentials_dir, name)
        return all(os.path.isfile(os.path.join(folder, f)) for f in ("tls.crt", "tls.key"))

    def _finish_gateway(self, g: GatewayBinding) -> None:
        bad = [lb for lb in g.listeners if not lb.usable]
        if bad and len(bad) == len(g.listeners):
            accepted = Condition(
                "Accepted", False, "ListenersNotValid", "no listener can be served"
            )
        elif bad:
            names = ", ".join(lb.spec.name for lb in bad)
            accepted = Condition(
                "Accepted", True, "ListenersNotValid", f"listeners not served: {names}"
            )
        else:
            accepted = Condition("Accepted", True, "Accepted")
        if len(bad) < len(g.listeners):
            programmed = Condition("Programmed", True, "Programmed")
        else:
            programmed = Condition("Programmed", False, "Invalid", "no listener is served")
        g.conditions = [accepted, programmed]

    # ----------------------------------------------------------------- routes

    def _route(self, res: Resource) -> RouteBinding:
        rb = RouteBinding(res)
        resolved = self._backends(rb)
        gateways = {
            (g.resource.metadata.namespace, g.resource.metadata.name): g
            for g in self.binding.gateways
        }
        all_gateways = {
            (r.metadata.namespace, r.metadata.name) for r in self.model.gateway_api("Gateway")
        }
        spec = res.spec
        route_ns = res.metadata.namespace
        for i, ref in enumerate(spec.parent_refs):
            path = f"spec.parentRefs[{i}]"
            group = gw.GATEWAY_API_GROUP if ref.group is None else ref.group
            if group != gw.GATEWAY_API_GROUP or (ref.kind or "Gateway") != "Gateway":
                continue  # a parent of another kind: not meshgate's to report on
            key = (ref.namespace or route_ns, ref.name)
            g = gateways.get(key)
            if g is None:
                if key in all_gateways:
                    continue  # a Gateway of another class: its controller reports
                accepted = Condition(
                    "Accepted",
                    False,
                    "NoMatchingParent",
                    f"Gateway {key[0]}/{key[1]} not found",
                    path=path,
                )
                rb.parents.append((i, ref, [accepted, resolved]))
                continue
            accepted = self._attach(rb, g, ref, path)
            rb.parents.append((i, ref, [accepted, resolved]))
        return rb

    def _attach(
        self, rb: RouteBinding, g: GatewayBinding, ref: gw.ParentReference, path: str
    ) -> Condition:
        res = rb.resource
        candidates = [
            lb
            for lb in g.listeners
            if (ref.section_name is None or lb.spec.name == ref.section_name)
            and (ref.port is None or lb.spec.port == ref.port)
        ]
        if not candidates:
            wanted = []
            if ref.section_name is not None:
                wanted.append(f"sectionName {ref.section_name}")
            if ref.port is not None:
                wanted.append(f"port {ref.port}")
            return Condition(
                "Accepted",
                False,
                "NoMatchingParent",
                f"Gateway has no listener with {' and '.join(wanted)}",
                path=path,
            )
        kind_ok = [lb for lb in candidates if res.kind in lb.supported_kinds]
        allowed = [lb for lb in kind_ok if _namespace_allowed(lb, res.metadata.namespace)]
        if not allowed:
            names = ", ".join(lb.spec.name for lb in candidates)
            if not kind_ok:
                message = f"{res.kind} is not among the route kinds of listener {names}"
            else:
                message = (
                    f"listener {names} does not allow routes from namespace "
                    f"{res.metadata.namespace} (allowedRoutes.namespaces)"
                )
            return Condition("Accepted", False, "NotAllowedByListeners", message, path=path)
        attached = 0
        for lb in allowed:
            domains = _intersect(lb.spec.hostname, res.spec.hostnames)
            if not domains:
                continue
            attached += 1
            lb.attached_routes += 1
            if lb.usable:
                served = self._isolate(lb, domains)
                if served:
                    rb.attachments.append(Attachment(res, lb, served))
        if not attached:
            return Condition(
                "Accepted",
                False,
                "NoMatchingListenerHostname",
                "no listener hostname intersects the route's hostnames",
                path="spec.hostnames",
            )
        return Condition("Accepted", True, "Accepted", path=path)

    def _backends(self, rb: RouteBinding) -> Condition:
        res = rb.resource
        problems: list[Condition] = []
        for r, rule in enumerate(res.spec.rules):
            for b, ref in enumerate(rule.backend_refs):
                backend = self._backend(res, ref, f"spec.rules[{r}].backendRefs[{b}]")
                rb.backends[(r, b)] = backend
                if backend.problem is not None:
                    problems.append(backend.problem)
                for f, flt in enumerate(ref.filters):
                    path = f"spec.rules[{r}].backendRefs[{b}].filters[{f}].requestMirror.backendRef"
                    self._mirror(rb, flt, ("mirror", r, b, f), path, problems)
            for f, flt in enumerate(rule.filters):
                path = f"spec.rules[{r}].filters[{f}].requestMirror.backendRef"
                self._mirror(rb, flt, ("mirror", r, f), path, problems)
        rb.problems = problems
        if not problems:
            return Condition("ResolvedRefs", True, "ResolvedRefs")
        first = problems[0]
        message = "; ".join(p.message for p in problems)
        return Condition("ResolvedRefs", False, first.reason, message, path=first.path)

    def _mirror(
        self,
        rb: RouteBinding,
        flt: gw.HTTPRouteFilter,
        key: tuple[Any, ...],
        path: str,
        problems: list[Condition],
    ) -> None:
        if flt.type != "RequestMirror" or flt.request_mirror is None:
            return
        backend = self._backend(rb.resource, flt.request_mirror.backend_ref, path)
        rb.backends[key] = backend
        if backend.problem is not None:
            problems.append(backend.problem)

    def _backend(self, res: Resource, ref: Any, path: str) -> Backend:
        route_ns = res.metadata.namespace
        group = ref.group or ""
        kind = ref.kind or "Service"
        ns = ref.namespace or route_ns
        host = f"{ref.name}.{ns}.svc.{CLUSTER_DOMAIN}"
        port = ref.port or 0
        if group != "" or kind != "Service":
            shown = f"{group}/{kind}" if group else kind
            return Backend(
                host,
                port,
                Condition(
                    "ResolvedRefs",
                    False,
                    "InvalidKind",
                    f"backend kind {shown} is not supported (only Service)",
                    path=path,
                ),
            )
        if ns != route_ns and not self.grants.allows(
            res.kind, route_ns, "", "Service", ns, ref.name
        ):
            return Backend(
                host,
                port,
                Condition(
                    "ResolvedRefs",
                    False,
                    "RefNotPermitted",
                    f"no ReferenceGrant in namespace {ns} lets {res.kind}s of {route_ns} "
                    f"use Service {ref.name}",
                    path=path,
                ),
            )
        se = self.services.get(host)
        if se is None:
            return Backend(
                host,
                port,
                Condition(
                    "ResolvedRefs",
                    False,
                    "BackendNotFound",
                    f"Service {ns}/{ref.name} not found (no ServiceEntry declares {host})",
                    path=path,
                ),
            )
        if se.spec.ports and not any(p.number == port for p in se.spec.ports):
            return Backend(
                host,
                port,
                Condition(
                    "ResolvedRefs",
                    False,
                    "BackendNotFound",
                    f"Service {ns}/{ref.name} has no port {port} "
                    f"(ServiceEntry {se.metadata.namespace}/{se.metadata.name})",
                    path=path,
                ),
            )
        return Backend(host, port)


def bind_gateway_api(
    model: Model, classes: Iterable[str] = ("meshgate",), credentials_dir: str | None = None
) -> Binding:
    """Attach every route of ``model`` and resolve every reference, for ``classes``.

    With ``credentials_dir`` (``--credentials-dir``), a certificateRef whose Secret
    has no files there is reported ``InvalidCertificateRef``; the only I/O here, and
    only when asked for: the compiler binds without it, so the Snapshot never depends
    on which files exist."""
    return _Binder(model, classes, credentials_dir).run()


# --------------------------------------------------------------------------- output


def _ref(resource: Resource) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": resource.kind}
    if resource.kind != "GatewayClass":  # cluster-scoped
        out["namespace"] = resource.metadata.namespace
    out["name"] = resource.metadata.name
    out["source"] = resource.source
    return out


def _parent_ref(ref: gw.ParentReference, route_ns: str) -> dict[str, Any]:
    out: dict[str, Any] = {"namespace": ref.namespace or route_ns, "name": ref.name}
    if ref.section_name is not None:
        out["sectionName"] = ref.section_name
    if ref.port is not None:
        out["port"] = ref.port
    return out


def status_to_dict(binding: Binding) -> dict[str, Any]:
    """Every object's status, as ``kubectl get -o yaml`` would show it (without the
    timestamps and generations a cluster adds)."""
    classes = [
        {**_ref(res), "status": {"conditions": [c.to_dict() for c in conditions]}}
        for res, conditions in binding.classes
    ]
    gateways = []
    for g in binding.gateways:
        listeners = [
            {
                "name": lb.spec.name,
                "attachedRoutes": lb.attached_routes,
                "supportedKinds": [
                    {"group": gw.GATEWAY_API_GROUP, "kind": kind} for kind in lb.supported_kinds
                ],
                "conditions": [c.to_dict() for c in lb.conditions],
            }
            for lb in g.listeners
        ]
        gateways.append(
            {
                **_ref(g.resource),
                "status": {
                    "conditions": [c.to_dict() for c in g.conditions],
                    "listeners": listeners,
                },
            }
        )
    routes = []
    for rb in binding.routes:
        ns = rb.resource.metadata.namespace
        parents = [
            {
                "parentRef": _parent_ref(ref, ns),
                "controllerName": gw.CONTROLLER_NAME,
                "conditions": [c.to_dict() for c in conditions],
            }
            for _, ref, conditions in rb.parents
        ]
        routes.append({**_ref(rb.resource), "status": {"parents": parents}})
    return {"gatewayClasses": classes, "gateways": gateways, "routes": routes}


def _warning(resource: Resource, condition: Condition) -> ConfigError:
    text = f"{condition.type}=False ({condition.reason})"
    if condition.type == "Conflicted":
        text = f"Conflicted=True ({condition.reason})"
    if condition.message:
        text = f"{text}: {condition.message}"
    path = condition.path
    return ConfigError(
        resource.kind,
        resource.metadata.namespace,
        resource.metadata.name,
        path,
        text,
        source=resource.where(path) if path else resource.source,
        warning=True,
    )


def status_warnings(binding: Binding) -> list[ConfigError]:
    """Every condition that is not as it should be, as a readable warning.

    ``Programmed=False`` is left out where it only echoes another condition."""
    out: list[ConfigError] = []
    for g in binding.gateways:
        for lb in g.listeners:
            for c in lb.conditions:
                bad = c.status if c.type == "Conflicted" else not c.status
                if bad and c.type != "Programmed":
                    out.append(_warning(g.resource, c))
    for rb in binding.routes:
        for _, _, conditions in rb.parents:
            out.extend(
                _warning(rb.resource, c)
                for c in conditions
                if c.type == "Accepted" and not c.status
            )
        # ResolvedRefs is one condition per parent; the warnings name each reference.
        out.extend(_warning(rb.resource, problem) for problem in rb.problems)
    return out
