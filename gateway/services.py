"""The services one gateway process runs beside its data plane: hot reload, request
metrics, trace propagation and export, and what the admin API reads.

``runtime.py`` creates one ``ProcessServices`` per process (the single process, each
worker, and the supervising parent) and wires it in with a few calls: the keyword
arguments for the ``Pipeline``, ``start``/``close`` around serving, the SIGHUP
handler, and the ``AdminState``. Keeping this here keeps the process wiring in
``runtime.py`` short.

With ``--workers N`` every worker reloads by itself from the same files (the parent
forwards SIGHUP, and each process polls the files), and the parent reloads its own
copy too, for ``/config_dump`` and ``/routes``. Compiling is deterministic, so all of
them reach the same ``Snapshot.version``; ``/config_dump`` lists each worker's version
so a straggler is visible. The parent does not ship snapshots to workers: that needs
a serialised Snapshot, which the control plane will bring.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .admin.app import AdminState, Readiness
from .admin.stats import cluster_stats, fetch_worker_stats, serve_stats
from .config.errors import Model
from .metrics import RequestMetrics, TcpMetrics, WorkloadLabels
from .reload import Build, OnApplied, Reloader
from .routing.table import Snapshot
from .tracing import OtlpExporter, TraceStage

__all__ = ["ProcessServices", "rebind_listeners"]


class ProcessServices:
    """Reload, metrics and tracing of one process, and its view for the admin API."""

    def __init__(
        self,
        *,
        paths: Sequence[str],
        build: Build,
        ref: Any,
        model: Model,
        readiness: Readiness,
        reload_interval_s: float = 1.0,
        trace_sampling: float = 0.01,
        otlp_endpoint: str | None = None,
        workload: WorkloadLabels | None = None,
        pools: Any = None,
        serving: bool = True,
        gateway_classes: tuple[str, ...] = ("meshgate",),
        credentials_dir: str | None = None,
    ) -> None:
        self.ref = ref
        self.gateway_classes = gateway_classes
        self.credentials_dir = credentials_dir
        self.readiness = readiness
        self.pools = pools
        self.workload = workload or WorkloadLabels("meshgate-ingressgateway", "istio-system")
        self.metrics = RequestMetrics() if serving else None
        # Connections proxied as TCP (TLS passthrough, ingress and egress).
        self.tcp_metrics = TcpMetrics() if serving else None
        self.tracing = TraceStage(trace_sampling) if serving else None
        self.exporter = (
            OtlpExporter(otlp_endpoint, self.workload.name) if serving and otlp_endpoint else None
        )
        self.reloader = Reloader(
            paths, build, ref, model, interval_s=reload_interval_s, on_applied=[self._applied]
        )
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self._stats_server: asyncio.AbstractServer | None = None
        self._stats_path: str | None = None

    # authn.runtime.SecurityRuntime of a serving process, set by the runtime.
    security: Any = None
    # ratelimit.Limiter of a serving process, set by the runtime.
    ratelimit: Any = None

    def pipeline_kwargs(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "tracing": self.tracing, "exporter": self.exporter}

    def on_applied(self, callback: OnApplied) -> None:
        """Run ``callback(old, new)`` after each applied reload (listeners, JWKS...)."""
        self.reloader.on_applied.append(callback)

    async def _applied(self, old: Snapshot, new: Snapshot) -> list[str]:
        self.readiness.snapshot_version = new.version
        return []

    def sighup(self) -> None:
        self.reloader.request()

    async def start(self, stats_dir: str | None = None) -> None:
        """Start watching the configuration (and, in a worker, answering the parent)."""
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.reloader.watch(self._stop)))
        if self.exporter is not None:
            self.exporter.start()
        if stats_dir is not None:
            self._stats_path = os.path.join(stats_dir, f"worker-{os.getpid()}.sock")
            self._stats_server = await serve_stats(self._stats_path, self.describe)

    async def close(self) -> None:
        self._stop.set()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.exporter is not None:
            await self.exporter.stop()
        if self._stats_server is not None:
            self._stats_server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._stats_path or "")

    def describe(self) -> dict[str, Any]:
        """This process's figures (``gateway.admin.stats``)."""
        snapshot = self.ref.current
        exporter = self.exporter
        return {
            "pid": os.getpid(),
            "version": snapshot.version if snapshot is not None else None,
            "reload": self.reloader.status.to_dict(),
            "metrics": self.metrics.export() if self.metrics is not None else [],
            "tcp_metrics": self.tcp_metrics.export() if self.tcp_metrics is not None else [],
            "clusters": cluster_stats(snapshot, self.pools),
            "tracing": {
                "exported": exporter.exported if exporter else 0,
                "dropped": exporter.dropped if exporter else 0,
            },
            "security": self.security.status() if self.security is not None else None,
            "ratelimit": self.ratelimit.status() if self.ratelimit is not None else None,
        }

    def admin_state(self, stats_dir: str | None = None) -> AdminState:
        """The admin API's view: this process's, or (``stats_dir``) every worker's."""
        processes: Callable[[], Awaitable[list[dict[str, Any]]]]
        if stats_dir is None:

            async def processes() -> list[dict[str, Any]]:
                return [self.describe()]

        else:

            async def processes() -> list[dict[str, Any]]:
                return await fetch_worker_stats(stats_dir)

        return AdminState(
            snapshot=lambda: self.ref.current,
            model=lambda: self.reloader.model,
            reload=self.reloader.status.to_dict,
            processes=processes,
            workload=self.workload,
            gateway_classes=self.gateway_classes,
            credentials_dir=self.credentials_dir,
        )


async def rebind_listeners(
    listeners: Any, old: Snapshot, new: Snapshot, served: Callable[[Snapshot], set[int]]
) -> list[str]:
    """Bind the listener ports a reload added; close the ones it removed; give TLS
    ports whose servers changed their new certificates and settings.

    A removed port stops accepting at once; its open connections finish the request
    they are on and are then closed (the graceful shutdown of each connection), since
    nothing routes on that port any more. A port that turns from cleartext to TLS or
    back is closed and bound again. Open TLS connections keep the certificate and
    settings they negotiated; new handshakes get the new ones.
    """
    problems: list[str] = []
    before, after = served(old), served(new)

    def is_tls(snapshot: Snapshot, port: int) -> bool:
        return bool(getattr(snapshot.listeners[port], "tls_servers", None))

    flipped = {port for port in before & after if is_tls(old, port) != is_tls(new, port)}
    for port in sorted((before - after) | flipped):
        listeners.close_port(port)
    store = listeners.certificates
    if store is not None:
        store.apply(new.listeners[port] for port in sorted(after) if is_tls(new, port))
    for port in sorted((after - before) | flipped):
        try:
            if is_tls(new, port):
                if store is None:
                    problems.append(f"TLS listener on port {port} is new: restart to serve it")
                    continue
                await listeners.start_tls([new.listeners[port]])
                problems.extend(
                    f"TLS: {problem}"
                    for problem in store.errors()
                    if problem.startswith(f"port {port}:")
                )
            else:
                await listeners.start([port])
        except OSError as exc:
            problems.append(f"cannot bind port {port}: {exc}")
    return problems
