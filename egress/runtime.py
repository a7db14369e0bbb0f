"""Wiring the egress gateway into one gateway process.

``gateway.runtime`` makes one ``EgressRuntime`` per worker when it serves as an egress
gateway and takes from it the stages the pipeline runs in place of its own, and the
handler its TLS listeners call for PASSTHROUGH servers. Nothing else in ``gateway``
knows that egress exists.
"""

from __future__ import annotations

from typing import Any

from gateway.upstream.pool import UpstreamPools

from .forward import Egress, EgressRouteStage, EgressUpstreamStage
from .passthrough import PassthroughHandler
from .registry import EgressSettings

__all__ = ["EgressRuntime"]


class EgressRuntime:
    """The egress parts of one worker: decisions, resolver, stages, passthrough."""

    def __init__(
        self,
        settings: EgressSettings,
        pools: UpstreamPools,
        access_log: Any = None,  # gateway.telemetry.AccessLog, for tunnels
        tcp_metrics: Any = None,  # gateway.metrics.TcpMetrics, for passthrough
    ) -> None:
        self.egress = Egress(settings, pools)
        self.pools = pools
        self.access_log = access_log
        self.tcp_metrics = tcp_metrics

    def passthrough(self, snapshots: Any) -> PassthroughHandler:
        """The handler for PASSTHROUGH servers (``ListenerSet.passthrough``)."""
        return PassthroughHandler(self.egress, snapshots, self.access_log, self.tcp_metrics)

    def pipeline_kwargs(self) -> dict[str, Any]:
        """The stages ``gateway.pipeline.Pipeline`` runs in place of its own."""
        return {
            "route_stage": EgressRouteStage(self.egress),
            "upstream_stage": EgressUpstreamStage(self.pools, self.egress),
        }
