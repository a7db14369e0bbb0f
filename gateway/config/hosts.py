"""Istio's host-name rules, shared by the validator and the compiler.

- A short name (no dot) in a resource of namespace ``ns`` means
  ``name.ns.svc.cluster.local``; a name with a dot, ``*`` or an IP is taken as written.
- ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not
  ``example.com``; ``*`` matches everything.
- Gateway server hosts may carry a namespace: ``ns/host``, ``./host`` (the Gateway's
  own namespace) or ``*/host`` (any namespace); no prefix means ``*/``.
- A VirtualService names gateways as ``name`` (its own namespace), ``ns/name``, or
  the reserved ``mesh``.
"""

from __future__ import annotations

import ipaddress

__all__ = [
    "CLUSTER_DOMAIN",
    "MESH_GATEWAY",
    "expand_host",
    "gateway_ref",
    "host_matches",
    "hosts_intersection",
    "split_server_host",
]

CLUSTER_DOMAIN = "cluster.local"
MESH_GATEWAY = "mesh"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def expand_host(host: str, namespace: str) -> str:
    """Istio's short-name expansion: ``reviews`` in ``default`` -> FQDN; lower-cased."""
    host = host.lower()
    if host == "*" or "." in host or _is_ip(host):
        return host
    return f"{host}.{namespace}.svc.{CLUSTER_DOMAIN}"


def host_matches(pattern: str, host: str) -> bool:
    """Does ``pattern`` (possibly ``*.suffix`` or ``*``) cover ``host``?

    When ``host`` is itself a wildcard, it is covered only if every name it matches is
    matched by ``pattern`` (``*.a.com`` covers ``*.b.a.com``).
    """
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        suffix = pattern[1:]  # ".example.com"
        if host.startswith("*."):
            return host[1:].endswith(suffix)
        return host.endswith(suffix) and len(host) > len(suffix)
    return pattern == host


def hosts_intersection(a: str, b: str) -> str | None:
    """The more specific of two host patterns when one covers the other, else None."""
    if host_matches(a, b):
        return b
    if host_matches(b, a):
        return a
    return None


def split_server_host(entry: str, gateway_namespace: str) -> tuple[str, str]:
    """``ns/host`` -> (namespace filter, host); ``*`` filter means any namespace."""
    namespace, sep, host = entry.partition("/")
    if not sep:
        return "*", entry.lower()
    if namespace == ".":
        namespace = gateway_namespace
    return namespace, host.lower()


def gateway_ref(ref: str, namespace: str) -> tuple[str, str]:
    """A VirtualService ``gateways`` entry -> (namespace, name); ``mesh`` -> ("", "mesh")."""
    if ref == MESH_GATEWAY:
        return "", MESH_GATEWAY
    ns, sep, name = ref.partition("/")
    if sep:
        return ns, name
    return namespace, ref
