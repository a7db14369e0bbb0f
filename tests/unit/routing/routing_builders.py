"""Test helpers: Istio resources from plain dicts (YAML spelling), requests, lookups.

The compiler's tests build ``Resource`` objects directly rather than going through
the YAML loader, so they exercise routing alone. ``resource()`` turns a dict spelled
like the YAML (``fooBar`` keys) into the typed spec using the dataclasses' own type
hints; it checks nothing (the validator's job) but refuses unknown keys so a typo in
a test cannot silently drop a field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gateway.config.errors import Model
from gateway.config.resources import API_VERSIONS, Metadata, Resource, yaml_name
from gateway.routing.compile import compile_snapshot
from gateway.routing.match import find_virtual_host, match_route
from gateway.routing.table import Route, Snapshot

DEFAULT_LABELS = {"istio": "ingressgateway"}


def _convert(tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner[0], value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_convert(item, v) for v in value]
    if origin is dict:
        _, item = typing.get_args(tp)
        return {k: _convert(item, v) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return build(tp, value)
    return value


def build(cls: type, data: dict[str, Any]) -> Any:
    """A spec dataclass from a dict in YAML spelling."""
    hints = typing.get_type_hints(cls)
    by_yaml = {f.metadata.get("yaml", yaml_name(f.name)): f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in by_yaml:
            raise KeyError(f"{cls.__name__} has no field {key!r}")
        f = by_yaml[key]
        kwargs[f.name] = _convert(hints[f.name], value)
    return cls(**kwargs)


def resource(kind: str, name: str, spec: dict[str, Any], namespace: str = "default") -> Resource:
    versions, spec_cls = API_VERSIONS[kind]
    return Resource(
        api_version=versions[0],
        kind=kind,
        metadata=Metadata(name=name, namespace=namespace),
        spec=build(spec_cls, spec),
        source=f"{name}.yaml:1",
        file=f"{name}.yaml",
    )


def gateway(
    name: str = "gw",
    hosts: list[str] | None = None,
    port: int = 8080,
    protocol: str = "HTTP",
    namespace: str = "default",
    selector: dict[str, str] | None = None,
    servers: list[dict[str, Any]] | None = None,
) -> Resource:
    if servers is None:
        servers = [
            {
                "port": {"number": port, "name": protocol.lower(), "protocol": protocol},
                "hosts": hosts if hosts is not None else ["*"],
            }
        ]
    spec = {"selector": DEFAULT_LABELS if selector is None else selector, "servers": servers}
    return resource("Gateway", name, spec, namespace)


def virtual_service(
    name: str,
    http: list[dict[str, Any]],
    hosts: list[str] | None = None,
    gateways: list[str] | None = None,
    namespace: str = "default",
) -> Resource:
    spec = {
        "hosts": hosts if hosts is not None else ["example.com"],
        "gateways": ["gw"] if gateways is None else gateways,
        "http": http,
    }
    return resource("VirtualService", name, spec, namespace)


def compile_resources(*resources: Resource, labels: dict[str, str] | None = None) -> Snapshot:
    return compile_snapshot(Model(tuple(resources)), DEFAULT_LABELS if labels is None else labels)


@dataclass
class Req:
    """A request for matching; implements ``MatchableRequest``."""

    path: str = "/"
    method: str = "GET"
    authority: str = "example.com"
    scheme: str = "http"
    port: int = 8080
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


def route_for(snapshot: Snapshot, request: Req) -> Route | None:
    listener = snapshot.listeners[request.port]
    vhost = find_virtual_host(listener, request.authority)
    if vhost is None:
        return None
    return match_route(vhost, request)


def fwd(host: str, **extra: Any) -> dict[str, Any]:
    """``route: [...]`` with one destination, for brevity."""
    return {"route": [{"destination": {"host": host}}], **extra}
