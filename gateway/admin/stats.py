"""Per-process figures for the admin API, and how they cross from workers to the parent.

Every serving process can describe itself as one JSON-able dict (``ProcessStats``):
its pid, Snapshot version, reload status, request and TCP metric aggregates,
upstream pool state and trace-export counters. With one process the admin API reads
that dict directly. With ``--workers N`` the parent serves the admin API; each worker listens
on a Unix socket in a private temporary directory made by the parent and, when
connected to, writes its dict and closes. The parent asks every worker at scrape time
and merges, so ``/metrics`` and ``/clusters`` are exact sums at that moment (no
periodic flush, nothing stale, nothing on the request path).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from ..routing.table import Snapshot

__all__ = ["cluster_stats", "fetch_worker_stats", "merge_clusters", "serve_stats"]


def cluster_stats(snapshot: Snapshot | None, pools: Any) -> list[dict[str, Any]]:
    """Each cluster of the Snapshot with what this process's pools know of its endpoints.

    ``health`` is ``HEALTHY`` unless the pool says otherwise; ``ejected`` and
    ``active_requests`` are read from the endpoint pool when it has them (outlier
    detection and request accounting fill them in), else reported as false / null.
    """
    if snapshot is None:
        return []
    out = []
    for name in sorted(snapshot.clusters):
        cluster = snapshot.clusters[name]
        endpoints = []
        for endpoint in cluster.endpoints:
            pool = pools.pool_for(endpoint) if pools is not None else None
            ejected = bool(getattr(pool, "ejected", False))
            endpoints.append(
                {
                    "address": endpoint.address,
                    "port": endpoint.port,
                    "weight": endpoint.weight,
                    "health": str(getattr(pool, "health", "UNHEALTHY" if ejected else "HEALTHY")),
                    "ejected": ejected,
                    "active_requests": getattr(pool, "active_requests", None),
                    "idle_connections": len(getattr(pool, "idle", ())),
                    "connections_opened": getattr(pool, "connections_opened", 0),
                }
            )
        out.append(
            {
                "name": name,
                "host": cluster.host,
                "port": cluster.port,
                "subset": cluster.subset,
                "protocol": cluster.protocol,
                "endpoints": endpoints,
            }
        )
    return out


def merge_clusters(per_process: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Sum the workers' views of the same clusters: counts add up, an endpoint is
    ejected (and unhealthy) if any worker ejected it."""
    merged: dict[str, dict[str, Any]] = {}
    for clusters in per_process:
        for cluster in clusters:
            into = merged.get(cluster["name"])
            if into is None:
                merged[cluster["name"]] = json.loads(json.dumps(cluster))
                continue
            by_endpoint = {(e["address"], e["port"]): e for e in into["endpoints"]}
            for endpoint in cluster["endpoints"]:
                mine = by_endpoint.get((endpoint["address"], endpoint["port"]))
                if mine is None:
                    into["endpoints"].append(dict(endpoint))
                    continue
                for key in ("idle_connections", "connections_opened"):
                    mine[key] += endpoint[key]
                if endpoint["active_requests"] is not None:
                    mine["active_requests"] = (mine["active_requests"] or 0) + endpoint[
                        "active_requests"
                    ]
                if endpoint["ejected"]:
                    mine["ejected"] = True
                if endpoint["health"] != "HEALTHY":
                    mine["health"] = endpoint["health"]
    return [merged[name] for name in sorted(merged)]


async def serve_stats(path: str, describe: Callable[[], dict[str, Any]]) -> asyncio.AbstractServer:
    """A worker's Unix socket: each connection gets ``describe()`` as JSON."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(describe(), separators=(",", ":")).encode())
            await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return await asyncio.start_unix_server(answer, path)


async def fetch_worker_stats(directory: str, timeout_s: float = 2.0) -> list[dict[str, Any]]:
    """Every worker's dict; a worker that does not answer in time is left out."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".sock"))
    except OSError:
        return []

    async def one(name: str) -> dict[str, Any] | None:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(os.path.join(directory, name))
                try:
                    data = await reader.read()
                finally:
                    writer.close()
            return json.loads(data)
        except (OSError, TimeoutError, ValueError):
            return None

    results = await asyncio.gather(*(one(name) for name in names))
    return [r for r in results if r is not None]
