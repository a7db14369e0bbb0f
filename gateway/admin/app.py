"""The admin API (starlette on hypercorn, on its own port, never on the request path).

    GET /healthz/ready   200 once a snapshot is loaded and every listener is bound
                         (every worker's, with several workers); 503 with the reason
    GET /config_dump     the active resources as loaded, the compiled Snapshot, its
                         version and the reload record (last errors with file:line)
    GET /routes          what ``meshgate routes --json`` prints (``?host=`` filters)
    GET /clusters        clusters, endpoints, health, ejection, pool figures
    GET /gateway_status  Gateway API status: the conditions of every GatewayClass,
                         Gateway, listener and route this gateway serves
    GET /metrics         Prometheus text: Istio's standard request and TCP metrics
                         and meshgate's own reload and trace-export counters

With several workers the parent serves it: ``/metrics`` and ``/clusters`` are the
sums of every worker's figures, fetched when asked (``gateway.admin.stats``).
Nothing secret is ever served: certificates and keys appear by path or name only,
and any value that holds PEM key material is replaced before it leaves.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from ..config.errors import Model
from ..metrics import WorkloadLabels
from ..routing.table import Snapshot

__all__ = ["AdminState", "Readiness", "build_admin_app", "redact", "serve_admin"]


@dataclass
class Readiness:
    snapshot_version: str | None = None
    listeners_up: bool = False
    draining: bool = False

    @property
    def ready(self) -> bool:
        return self.snapshot_version is not None and self.listeners_up and not self.draining


@dataclass
class AdminState:
    """Where the admin API reads from; every field is read at request time.

    ``processes`` returns one ``ProcessStats`` dict per serving process (this one's,
    or every worker's). ``snapshot``/``model``/``reload`` describe the configuration
    the process serving the admin API holds (with workers, the parent's own copy,
    which reloads from the same files; each worker's version is in ``processes``)."""

    snapshot: Callable[[], Snapshot | None]
    model: Callable[[], Model | None]
    reload: Callable[[], dict[str, Any]]
    processes: Callable[[], Awaitable[list[dict[str, Any]]]]
    workload: WorkloadLabels = field(
        default_factory=lambda: WorkloadLabels("meshgate-ingressgateway", "istio-system")
    )
    gateway_classes: tuple[str, ...] = ("meshgate",)  # --gateway-class
    credentials_dir: str | None = None  # --credentials-dir, for certificateRefs in status


def build_admin_app(readiness: Readiness, state: AdminState | None = None) -> Starlette:
    async def ready(request: Request) -> PlainTextResponse:
        if readiness.ready:
            return PlainTextResponse(f"ready {readiness.snapshot_version}\n")
        if readiness.draining:
            reason = "draining"
        elif readiness.snapshot_version is None:
            reason = "no configuration loaded"
        else:
            reason = "listeners not up"
        return PlainTextResponse(f"not ready: {reason}\n", status_code=503)

    routes = [Route("/healthz/ready", ready)]
    if state is not None:
        routes.extend(_state_routes(state))
    return Starlette(routes=routes)


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(redact(data), indent=2, ensure_ascii=False, default=str)
    return Response(body + "\n", status_code=status, media_type="application/json")


_PEM = "-----BEGIN"


def redact(data: Any) -> Any:
    """``data`` with every string that carries PEM material replaced: whatever a
    resource or policy holds inline, key material never leaves through the admin API."""
    if isinstance(data, str):
        return "[redacted PEM]" if _PEM in data else data
    if isinstance(data, dict):
        return {k: redact(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [redact(v) for v in data]
    return data


def _resource(resource: Any) -> dict[str, Any]:
    from ..routing.compile import plain

    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": plain(resource.metadata),
        "source": resource.source,
        "spec": plain(resource.spec),
    }


def _state_routes(state: AdminState) -> list[Route]:
    from ..metrics import merge_exports, merge_tcp_exports, render_text
    from ..routing.dump import format_routes, snapshot_to_dict
    from .stats import merge_clusters

    async def config_dump(request: Request) -> Response:
        snapshot = state.snapshot()
        model = state.model()
        processes = await state.processes()
        return _json(
            {
                "version": snapshot.version if snapshot is not None else None,
                "reload": state.reload(),
                "workers": [
                    {"pid": p.get("pid"), "version": p.get("version"), "reload": p.get("reload")}
                    for p in processes
                ],
                "resources": [_resource(r) for r in model.resources] if model else [],
                "snapshot": snapshot_to_dict(snapshot) if snapshot is not None else None,
                # Per process: JWKS health (last success, last error, key count) and
                # authentication/authorization decision counters.
                "security": [p["security"] for p in processes if p.get("security")],
            }
        )

    async def routes(request: Request) -> Response:
        snapshot = state.snapshot()
        if snapshot is None:
            return _json({"error": "no configuration loaded"}, 503)
        text = format_routes(snapshot, host=request.query_params.get("host"), as_json=True)
        return Response(text + "\n", media_type="application/json")

    async def gateway_status(request: Request) -> Response:
        from ..config.gatewayapi_status import bind_gateway_api, status_to_dict

        model = state.model()
        if model is None:
            return _json({"error": "no configuration loaded"}, 503)
        binding = bind_gateway_api(model, state.gateway_classes, state.credentials_dir)
        return _json(status_to_dict(binding))

    async def clusters(request: Request) -> Response:
        processes = await state.processes()
        snapshot = state.snapshot()
        return _json(
            {
                "version": snapshot.version if snapshot is not None else None,
                "clusters": merge_clusters(p.get("clusters", []) for p in processes),
            }
        )

    async def metrics(request: Request) -> Response:
        processes = await state.processes()
        snapshot = state.snapshot()
        known = snapshot.clusters if snapshot is not None else {}

        def protocol_of(name: str) -> str:
            cluster = known.get(name)
            return "grpc" if cluster is not None and cluster.protocol == "GRPC" else "http"

        series = merge_exports(p.get("metrics", []) for p in processes)
        tcp = merge_tcp_exports(p.get("tcp_metrics", []) for p in processes)
        body = render_text(series, state.workload, protocol_of, tcp)
        body += _own_metrics(state.reload(), processes)
        from authn.stats import render_exports

        body += render_exports([p["security"] for p in processes if p.get("security")])
        from ratelimit.stats import render_exports as render_ratelimit

        body += render_ratelimit([p["ratelimit"] for p in processes if p.get("ratelimit")])
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    return [
        Route("/config_dump", config_dump),
        Route("/routes", routes),
        Route("/clusters", clusters),
        Route("/gateway_status", gateway_status),
        Route("/metrics", metrics),
    ]


def _own_metrics(reload: dict[str, Any], processes: list[dict[str, Any]]) -> bytes:
    """meshgate's own counters, in the same exposition."""
    lines = [
        "# HELP meshgate_config_reloads_total Configuration reloads by result.",
        "# TYPE meshgate_config_reloads_total counter",
    ]
    for result in ("applied", "unchanged", "rejected"):
        lines.append(f'meshgate_config_reloads_total{{result="{result}"}} {reload.get(result, 0)}')
    exported = sum(p.get("tracing", {}).get("exported", 0) for p in processes)
    dropped = sum(p.get("tracing", {}).get("dropped", 0) for p in processes)
    lines += [
        "# HELP meshgate_otlp_spans_exported_total Spans delivered to the OTLP collector.",
        "# TYPE meshgate_otlp_spans_exported_total counter",
        f"meshgate_otlp_spans_exported_total {exported}",
        "# HELP meshgate_otlp_spans_dropped_total Spans dropped: queue full or export failed.",
        "# TYPE meshgate_otlp_spans_dropped_total counter",
        f"meshgate_otlp_spans_dropped_total {dropped}",
        "# HELP meshgate_workers Serving processes that answered this scrape.",
        "# TYPE meshgate_workers gauge",
        f"meshgate_workers {len(processes)}",
    ]
    return ("\n".join(lines) + "\n").encode()


def _plain_lifespan(app: Starlette) -> Any:
    """The app with lifespan answered here, so that hypercorn's shutdown (which
    cancels the lifespan task) ends quietly instead of reporting a failure."""

    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return
        try:
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        except asyncio.CancelledError:
            return

    return asgi


async def serve_admin(
    readiness: Readiness,
    port: int,
    stop: asyncio.Event,
    state: AdminState | None = None,
    *,
    address: str = "127.0.0.1",
) -> None:
    """Serve the admin app on ``address``:``port`` (loopback unless told otherwise)
    until ``stop`` is set."""
    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    # hypercorn spells an IPv6 bind address in brackets.
    host = f"[{address}]" if ":" in address else address
    config.bind = [f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    await serve(
        _plain_lifespan(build_admin_app(readiness, state)), config, shutdown_trigger=stop.wait
    )
