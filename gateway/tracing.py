"""Trace context: W3C ``traceparent`` and Zipkin B3 headers, and optional OTLP export.

What it owns: ``TraceStage``, the request stage that continues the client's trace
(or starts one) and tells the upstream about the gateway's own span, and
``OtlpExporter``, which ships finished spans as OTLP/HTTP JSON in batches. What it
leaves to others: where the stage runs (``pipeline.py``) and when a span ends (the
pipeline calls ``OtlpExporter.finish`` when the access-log line is written).

Propagation follows what Envoy does as a tracing proxy: the trace id is kept, the
gateway's span gets a new 64-bit id whose parent is the client's span, and the
upstream sees the gateway's span as its parent —

    traceparent: 00-<trace id>-<gateway span id>-<flags>     (tracestate untouched)
    x-b3-traceid: <trace id>   x-b3-spanid: <gateway span id>
    x-b3-parentspanid: <client span id, if any>   x-b3-sampled: 1 | 0

A request with neither header starts a trace, sampled with the configured
probability (Istio's default is 1%); a request that carries a sampling decision
keeps it. A malformed ``traceparent`` is ignored (the W3C rule: restart the trace),
then B3 is tried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import time
from collections import deque
from operator import itemgetter
from typing import Any
from urllib.parse import urlsplit

__all__ = ["OtlpExporter", "Span", "TraceStage", "parse_traceparent"]

log = logging.getLogger("meshgate.tracing")

_TRACE_HEADERS = frozenset(
    {"traceparent", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "b3"}
)


class Span(tuple):  # type: ignore[type-arg]
    """The gateway's span of one request: trace id, span id, parent id, sampled, start.

    A tuple underneath, because one is made for every request and a tuple is built in
    C (``_new_span``) where a class with an ``__init__`` costs a Python call."""

    __slots__ = ()

    def __new__(
        cls, trace_id: str, span_id: str, parent_id: str, sampled: bool, start_wall: float
    ) -> Span:
        return tuple.__new__(cls, (trace_id, span_id, parent_id, sampled, start_wall))

    trace_id: str = property(itemgetter(0))  # type: ignore[assignment]
    span_id: str = property(itemgetter(1))  # type: ignore[assignment]
    parent_id: str = property(itemgetter(2))  # type: ignore[assignment]
    sampled: bool = property(itemgetter(3))  # type: ignore[assignment]
    start_wall: float = property(itemgetter(4))  # type: ignore[assignment]


_new_span = tuple.__new__
_LOW64 = (1 << 64) - 1


# One compiled match instead of splitting and building character sets: the parse is
# on the path of every request that arrives with trace context.
_TRACEPARENT = re.compile(
    r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?", re.DOTALL
)
_HEX_OF = {16: re.compile("[0-9a-f]{16}"), 32: re.compile("[0-9a-f]{32}")}
_ZEROS = frozenset({"0" * 16, "0" * 32})


def _is_hex(text: str, length: int) -> bool:
    # ``length`` is 16 or 32, the only id sizes in W3C and B3.
    return _HEX_OF[length].fullmatch(text) is not None and text not in _ZEROS


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid ``traceparent``, else None.

    Per W3C Trace Context: version ``ff`` is invalid; an unknown higher version is
    parsed by the version-00 layout (extra fields ignored); all-zero ids are invalid.
    """
    match = _TRACEPARENT.fullmatch(value.strip().lower())
    if match is None:
        return None
    version, trace_id, parent_id, flags, extra = match.groups()
    if version == "ff" or (version == "00" and extra is not None):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def _parse_b3(trace_id: str, span_id: str, sampled: str) -> tuple[str, str, bool | None] | None:
    trace_id = trace_id.lower()
    span_id = span_id.lower()
    if not (_is_hex(trace_id, 32) or _is_hex(trace_id, 16)):
        return None
    if span_id and not _is_hex(span_id, 16):
        return None
    decision: bool | None = None
    if sampled:
        decision = sampled.lower() in ("1", "true", "d")
    return trace_id, span_id, decision


class TraceStage:
    """Continues or starts the trace and rewrites the trace headers for the upstream.

    ``sampling`` is the probability (0..1) of sampling a trace the gateway starts.
    ``ctx.trace`` holds the gateway's ``Span`` for the exporter and the access log.
    """

    def __init__(self, sampling: float = 0.01, rnd: random.Random | None = None) -> None:
        self.sampling = sampling
        self.rnd = rnd or random.Random()
        self._getrandbits = self.rnd.getrandbits
        # A trace the gateway starts is sampled when the low 64 bits of its (random)
        # trace id fall under this threshold: one integer comparison, no second
        # random draw, and the decision follows from the trace id as in
        # OpenTelemetry's ratio sampler. 1.0 gives 2**64, above every 64-bit value.
        self._threshold = int(max(0.0, min(1.0, sampling)) * (1 << 64))

    def on_request(self, ctx: Any) -> None:
        head = ctx.head
        if not ctx.trace_headers:
            # The common case: EdgeHeadersStage saw no trace header, so there is
            # nothing to continue or remove. One 192-bit draw gives the trace id
            # (high 128 bits) and the gateway's span id (low 64), one conversion
            # gives both as hex (bytes.hex is about twice as fast as format()).
            bits = self._getrandbits(192)
            if not (bits >> 64 and bits & _LOW64):  # an all-zero id is invalid
                bits |= 1 << 64 | 1
            text = bits.to_bytes(24).hex()
            trace_id = text[:32]
            span_id = text[32:]
            if (bits >> 64) & _LOW64 < self._threshold:
                head.headers += (
                    ("traceparent", f"00-{trace_id}-{span_id}-01"),
                    ("x-b3-traceid", trace_id),
                    ("x-b3-spanid", span_id),
                    ("x-b3-sampled", "1"),
                )
                sampled = True
            else:
                head.headers += (
                    ("traceparent", f"00-{trace_id}-{span_id}-00"),
                    ("x-b3-traceid", trace_id),
                    ("x-b3-spanid", span_id),
                    ("x-b3-sampled", "0"),
                )
                sampled = False
            head._index = None  # what head.invalidate() does, without the call
            ctx.trace = _new_span(Span, (trace_id, span_id, "", sampled, ctx.start_wall))
            return
        self._continue(ctx, head)

    def _continue(self, ctx: Any, head: Any) -> None:
        """The request may carry trace headers: parse, continue and replace them."""
        traceparent = b3_trace = b3_span = b3_sampled = ""
        found = False
        for name, value in head.headers:
            if name in _TRACE_HEADERS:
                found = True
                if name == "traceparent":
                    traceparent = value
                elif name == "x-b3-traceid":
                    b3_trace = value
                elif name == "x-b3-spanid":
                    b3_span = value
                elif name == "x-b3-sampled":
                    b3_sampled = value
        rnd = self.rnd
        trace_id = parent_id = ""
        sampled: bool | None = None
        b3_short = False
        if traceparent:
            parsed = parse_traceparent(traceparent)
            if parsed is not None:
                trace_id, parent_id, sampled = parsed
        if not trace_id and b3_trace:
            b3 = _parse_b3(b3_trace, b3_span, b3_sampled)
            if b3 is not None:
                trace_id, parent_id, sampled = b3
                b3_short = len(trace_id) == 16
        if not trace_id:
            trace_id = rnd.getrandbits(128).to_bytes(16).hex()
        if sampled is None:
            sampled = rnd.random() < self.sampling
        span_id = f"{rnd.getrandbits(64):016x}"
        # W3C needs 128 bits: a 64-bit B3 trace id is left-padded with zeros.
        w3c_trace = trace_id.rjust(32, "0")
        headers = (
            [(n, v) for n, v in head.headers if n not in _TRACE_HEADERS] if found else head.headers
        )
        flag = "1" if sampled else "0"
        headers.append(("traceparent", f"00-{w3c_trace}-{span_id}-0{flag}"))
        headers.append(("x-b3-traceid", trace_id if b3_short else w3c_trace))
        headers.append(("x-b3-spanid", span_id))
        if parent_id:
            headers.append(("x-b3-parentspanid", parent_id))
        headers.append(("x-b3-sampled", flag))
        head.headers = headers
        head.invalidate()
        ctx.trace = _new_span(Span, (w3c_trace, span_id, parent_id, sampled, ctx.start_wall))


# --------------------------------------------------------------------------- export


class OtlpExporter:
    """Batches finished, sampled spans and POSTs them as OTLP/HTTP JSON.

    The queue is bounded (``max_queue`` spans): a span that finds it full is dropped
    and counted, so a slow or absent collector costs memory only up to the bound and
    never delays a request. A batch that cannot be delivered (connection refused,
    timeout, non-2xx) is dropped and counted too; there is no retry, by design — a
    trace is worth less than the gateway's memory.
    """

    def __init__(
        self,
        endpoint: str,
        service_name: str = "meshgate",
        *,
        max_queue: int = 2048,
        max_batch: int = 512,
        interval_s: float = 1.0,
        timeout_s: float = 2.0,
    ) -> None:
        url = urlsplit(endpoint)
        if url.scheme != "http" or not url.hostname:
            raise ValueError(f"OTLP endpoint must be an http:// URL, not {endpoint!r}")
        self.host = url.hostname
        self.port = url.port or 80
        self.path = url.path or "/v1/traces"
        self.service_name = service_name
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.queue: deque[dict[str, Any]] = deque()
        self.exported = 0
        self.dropped = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def finish(self, ctx: Any, status: int, route: str, end_wall: float | None = None) -> None:
        """Queue the request's span if it was sampled (called once per request)."""
        span: Span | None = getattr(ctx, "trace", None)
        if span is None or not span.sampled:
            return
        if len(self.queue) >= self.max_queue:
            self.dropped += 1
            return
        end = end_wall if end_wall is not None else time.time()
        head = ctx.head
        attributes = [
            _attr("http.request.method", head.method),
            _attr("url.path", head.path),
            _attr("server.address", ctx.authority),
            _int_attr("http.response.status_code", status),
            _attr("meshgate.route", route),
            _attr("meshgate.upstream_cluster", getattr(ctx, "upstream_cluster", "") or "-"),
        ]
        item: dict[str, Any] = {
            "traceId": span.trace_id,
            "spanId": span.span_id,
            "name": f"{head.method} {ctx.authority}",
            "kind": 2,  # SPAN_KIND_SERVER: the gateway serves the client's request
            "startTimeUnixNano": str(int(span.start_wall * 1e9)),
            "endTimeUnixNano": str(int(end * 1e9)),
            "attributes": attributes,
            "status": {"code": 2 if status >= 500 or status == 0 else 0},
        }
        if span.parent_id:
            item["parentSpanId"] = span.parent_id.rjust(16, "0")
        self.queue.append(item)
        if len(self.queue) >= self.max_batch:
            self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Send what is queued (one last attempt each batch), then stop.

        The sender is asked to finish rather than cancelled, so a batch already on
        the wire is counted as exported or dropped, never lost in between."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        while self.queue:
            await self._send_batch()

    async def _run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()
            self._wake.clear()
            while self.queue:
                await self._send_batch()

    async def _send_batch(self) -> None:
        batch = [self.queue.popleft() for _ in range(min(self.max_batch, len(self.queue)))]
        body = json.dumps(
            {
                "resourceSpans": [
                    {
                        "resource": {"attributes": [_attr("service.name", self.service_name)]},
                        "scopeSpans": [{"scope": {"name": "meshgate"}, "spans": batch}],
                    }
                ]
            },
            separators=(",", ":"),
        ).encode()
        try:
            async with asyncio.timeout(self.timeout_s):
                status = await self._post(body)
        except (OSError, TimeoutError, ValueError) as exc:
            self.dropped += len(batch)
            log.warning("OTLP export to %s:%s failed: %r", self.host, self.port, exc)
            return
        if 200 <= status < 300:
            self.exported += len(batch)
        else:
            self.dropped += len(batch)
            log.warning("OTLP collector answered %s; %d spans dropped", status, len(batch))

    async def _post(self, body: bytes) -> int:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(
                (
                    f"POST {self.path} HTTP/1.1\r\nhost: {self.host}:{self.port}\r\n"
                    f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n"
                ).encode()
                + body
            )
            await writer.drain()
            status_line = await reader.readline()
            parts = status_line.split()
            if len(parts) < 2 or not parts[1].isdigit():
                raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
            return int(parts[1])
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _attr(key: str, value: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": value}}


def _int_attr(key: str, value: int) -> dict[str, Any]:
    return {"key": key, "value": {"intValue": str(value)}}
