"""The access log: one line per request, JSON (default) or a readable text variant.

Lines are formatted straight from the request's context (no intermediate dict),
gathered in memory and written to stdout once per event-loop tick (or sooner when
many are waiting), so a busy worker makes one ``write`` per tick instead of one per
request. Field meanings are documented in ``docs/operations.md``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from json.encoder import encode_basestring as _quote
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .routing.table import Route
    from .server.events import RequestHead

__all__ = ["AccessLog", "RequestRecord", "format_json", "format_text", "rfc3339", "route_label"]

_FLUSH_AT = 256  # lines; past this, write without waiting for the tick to end

_cached_second = -1
_cached_prefix = ""
_cached_milli = -1
_cached_stamp = ""


def rfc3339(wall: float) -> str:
    """``2024-05-01T12:00:00.123Z`` (truncated to the millisecond). A busy worker logs
    many requests per millisecond, so the stamp is kept for its millisecond, and the
    part up to the seconds for its second."""
    global _cached_second, _cached_prefix, _cached_milli, _cached_stamp
    milli = int(wall * 1000.0)
    if milli == _cached_milli:
        return _cached_stamp
    second, rest = divmod(milli, 1000)
    if second != _cached_second:
        _cached_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _cached_second = second
    _cached_milli = milli
    _cached_stamp = f"{_cached_prefix}.{rest:03d}Z"
    return _cached_stamp


class RequestRecord(Protocol):
    """What the access log reads of a finished request (``stages.RequestContext``)."""

    head: RequestHead
    start: float  # perf_counter() when the head was complete
    start_wall: float  # time.time() at the same moment
    method: str
    authority: str
    path: str
    status: int
    flags: str
    route: Route | None
    upstream_cluster: str
    upstream_host: str
    bytes_received: int
    bytes_sent: int
    upstream_ms: float | None
    request_id: str
    xff: str
    user_agent: str
    authz: str  # the AuthorizationPolicy decision, "" when no policy is bound


_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0", "2": "HTTP/2", "3": "HTTP/3"}

# id(route) -> (route, "Kind/ns/name:route-name"). The route is kept beside its
# label so that an id reused after a reload can never hand out a stale label.
_ROUTE_LABELS: dict[int, tuple[Route, str]] = {}


def route_label(route: Route | None) -> str:
    """The access log's ``route`` field: ``Kind/ns/name`` plus ``:name`` if named."""
    if route is None:
        return "-"
    cached = _ROUTE_LABELS.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    label = route.origin.ref
    if route.name:
        label = f"{label}:{route.name}"
    if len(_ROUTE_LABELS) >= 4096:
        _ROUTE_LABELS.clear()  # routes of old snapshots; rebuilt on demand
    _ROUTE_LABELS[id(route)] = (route, label)
    return label


class AccessLog:
    """Formats one line per request and writes the lines to a file descriptor."""

    def __init__(self, log_format: str = "json", fd: int = 1) -> None:
        if log_format not in ("json", "text"):
            raise ValueError(f"log format must be json or text, not {log_format!r}")
        self.fd = fd
        self._lines: list[str] = []
        self._scheduled = False
        self.format: Callable[[RequestRecord, float], str] = (
            format_json if log_format == "json" else format_text
        )

    def log(self, record: RequestRecord, now: float) -> None:
        """Queue the line of a request that ended at ``now`` (``perf_counter()``);
        written at the end of this loop tick."""
        lines = self._lines
        lines.append(self.format(record, now))
        if len(lines) >= _FLUSH_AT:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "backslashreplace")
        self._lines = []
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return  # stdout gone (closed pipe): logging must never stop traffic
            view = view[written:]


# (id(route), cluster, host) -> (route, the log's route/cluster/host fields, quoted).
# The three are fixed for a route and endpoint; the route is kept beside its entry so
# that an id reused after a reload can never hand out a stale one.
_UPSTREAM_FIELDS: dict[tuple[int, str, str], tuple[Route | None, str]] = {}


def _upstream_fields(route: Route | None, cluster: str, host: str) -> str:
    key = (id(route), cluster, host)
    cached = _UPSTREAM_FIELDS.get(key)
    if cached is not None and cached[0] is route:
        return cached[1]
    q = _quote
    text = (
        f'"route":{q(route_label(route))},"upstream_cluster":{q(cluster or "-")},'
        f'"upstream_host":{q(host or "-")}'
    )
    if len(_UPSTREAM_FIELDS) >= 4096:
        _UPSTREAM_FIELDS.clear()  # routes of old snapshots; rebuilt on demand
    _UPSTREAM_FIELDS[key] = (route, text)
    return text


def format_json(r: RequestRecord, now: float) -> str:
    """One JSON object per line. Hand-built rather than ``json.dumps``, and read
    straight from the request's context rather than through a dict: the field set
    is fixed, strings go through the C string escaper, the fields fixed for a route
    and endpoint are formatted once, and it costs a fraction of the generic path
    (measured with ``loadtest/bench_hotpath.py``)."""
    q = _quote
    head = r.head
    upstream_ms = r.upstream_ms
    version = head.http_version
    # Only requests an AuthorizationPolicy looked at carry the field.
    authz = f',"authz":{q(r.authz)}' if r.authz else ""
    return (
        f'{{"start_time":"{rfc3339(r.start_wall)}","method":{q(r.method)},'
        f'"authority":{q(r.authority)},"path":{q(r.path)},'
        f'"protocol":"{_PROTOCOLS.get(version) or version}","status":{r.status:d},'
        f'"response_flags":"{r.flags or "-"}",'
        f"{_upstream_fields(r.route, r.upstream_cluster, r.upstream_host)},"
        f'"bytes_received":{r.bytes_received:d},"bytes_sent":{r.bytes_sent:d},'
        f'"duration_ms":{(now - r.start) * 1000.0:.3f},'
        f'"upstream_service_time_ms":'
        f"{'null' if upstream_ms is None else f'{upstream_ms:.3f}'},"
        f'"request_id":{q(r.request_id or "-")},"x_forwarded_for":{q(r.xff or head.peer)},'
        f'"user_agent":{q(r.user_agent)}{authz}}}\n'
    )


def format_text(r: RequestRecord, now: float) -> str:
    """Modelled on Envoy's default access-log line, followed by the route."""
    head = r.head
    upstream_ms = r.upstream_ms
    version = head.http_version
    return (
        f'[{rfc3339(r.start_wall)}] "{r.method} {r.path} {_PROTOCOLS.get(version) or version}" '
        f"{r.status} {r.flags or '-'} {r.bytes_received} {r.bytes_sent} "
        f"{round((now - r.start) * 1000.0, 3)} "
        f"{None if upstream_ms is None else round(upstream_ms, 3)} "
        f'"{r.xff or head.peer}" "{r.user_agent}" "{r.request_id or "-"}" '
        f'"{r.authority}" "{r.upstream_host or "-"}" {route_label(r.route)} '
        f"{r.upstream_cluster or '-'}{' ' + r.authz if r.authz else ''}\n"
    )
