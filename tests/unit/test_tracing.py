"""Trace context propagation (W3C and B3) and the OTLP/HTTP JSON exporter."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import time
from typing import Any

from gateway.server.events import RequestHead
from gateway.stages import EdgeHeadersStage, RequestContext
from gateway.tracing import OtlpExporter, TraceStage, parse_traceparent

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


class _Stream:
    def __init__(self, head: RequestHead) -> None:
        self.head = head


def _ctx(*headers: tuple[str, str]) -> RequestContext:
    head = RequestHead("GET", "/p", "", "shop.example", "http", list(headers), port=8080)
    return RequestContext(_Stream(head), None, 0.0, 1_700_000_000.0)  # type: ignore[arg-type]


def _headers(ctx: RequestContext) -> dict[str, str]:
    return dict(ctx.head.headers)


def _all(ctx: RequestContext, name: str) -> list[str]:
    return [v for n, v in ctx.head.headers if n == name]


def test_traceparent_keeps_the_trace_and_makes_the_gateway_span_the_parent() -> None:
    ctx = _ctx(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"), ("tracestate", "k=v"))
    TraceStage(sampling=0.0).on_request(ctx)
    headers = _headers(ctx)
    version, trace, span, flags = headers["traceparent"].split("-")
    assert (version, trace, flags) == ("00", CLIENT_TRACE, "01")
    assert span != CLIENT_SPAN and len(span) == 16 and int(span, 16) != 0
    assert headers["x-b3-traceid"] == CLIENT_TRACE
    assert headers["x-b3-spanid"] == span
    assert headers["x-b3-parentspanid"] == CLIENT_SPAN
    assert headers["x-b3-sampled"] == "1"  # the client's decision wins over sampling=0
    assert headers["tracestate"] == "k=v"
    assert len(_all(ctx, "traceparent")) == 1
    assert ctx.trace.parent_id == CLIENT_SPAN and ctx.trace.sampled


def test_unsampled_traceparent_stays_unsampled() -> None:
    ctx = _ctx(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"))
    TraceStage(sampling=1.0).on_request(ctx)
    assert _headers(ctx)["traceparent"].endswith("-00")
    assert _headers(ctx)["x-b3-sampled"] == "0"


def test_request_without_context_starts_a_trace_sampled_per_setting() -> None:
    sampled = _ctx()
    TraceStage(sampling=1.0).on_request(sampled)
    _, trace, _, flags = _headers(sampled)["traceparent"].split("-")
    assert len(trace) == 32 and int(trace, 16) != 0 and flags == "01"
    assert "x-b3-parentspanid" not in _headers(sampled)
    not_sampled = _ctx()
    TraceStage(sampling=0.0).on_request(not_sampled)
    assert _headers(not_sampled)["traceparent"].endswith("-00")
    rnd = random.Random(7)
    stage = TraceStage(sampling=0.25, rnd=rnd)
    decisions = []
    for _ in range(4000):
        ctx = _ctx()
        stage.on_request(ctx)
        decisions.append(ctx.trace.sampled)
    assert 0.2 < sum(decisions) / len(decisions) < 0.3


def test_b3_headers_are_continued_when_there_is_no_traceparent() -> None:
    ctx = _ctx(
        ("x-b3-traceid", "a3ce929d0e0e4736"),
        ("x-b3-spanid", CLIENT_SPAN),
        ("x-b3-sampled", "1"),
    )
    TraceStage(sampling=0.0).on_request(ctx)
    headers = _headers(ctx)
    assert headers["x-b3-traceid"] == "a3ce929d0e0e4736"  # 64-bit id kept as sent
    assert headers["traceparent"].split("-")[1] == "0000000000000000a3ce929d0e0e4736"
    assert headers["x-b3-parentspanid"] == CLIENT_SPAN
    assert headers["x-b3-spanid"] != CLIENT_SPAN
    assert headers["x-b3-sampled"] == "1"
    assert len(_all(ctx, "x-b3-spanid")) == 1


def test_malformed_traceparent_restarts_the_trace() -> None:
    for bad in (
        f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
        f"00-{'0' * 32}-{CLIENT_SPAN}-01",
        f"00-{CLIENT_TRACE}-{'0' * 16}-01",
        f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01-extra",
        "00-xyz-abc-01",
        "",
    ):
        assert parse_traceparent(bad) is None, bad
    assert parse_traceparent(f"01-{CLIENT_TRACE}-{CLIENT_SPAN}-03-future") == (
        CLIENT_TRACE,
        CLIENT_SPAN,
        True,
    )
    ctx = _ctx(("traceparent", f"ff-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
    TraceStage(sampling=0.0).on_request(ctx)
    assert CLIENT_TRACE not in _headers(ctx)["traceparent"]


def test_trace_stage_costs_a_few_microseconds() -> None:
    stage = TraceStage(sampling=0.01)
    best = float("inf")
    for _ in range(7):  # best of several short rounds: the machine is shared
        heads = [_ctx(("user-agent", "x"), ("accept", "*/*")) for _ in range(1000)]
        start = time.perf_counter()
        for ctx in heads:
            stage.on_request(ctx)
        best = min(best, (time.perf_counter() - start) / len(heads))
    print(f"TraceStage.on_request: {best * 1e6:.2f} us")
    assert best < 10e-6


# --------------------------------------------------------------------------- OTLP


class _Collector:
    """A small real OTLP/HTTP collector: records each POSTed JSON body."""

    def __init__(self, status: int = 200) -> None:
        self.status = status
        self.bodies: list[dict[str, Any]] = []
        self.received = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.bodies.append(json.loads(body))
        writer.write(f"HTTP/1.1 {self.status} X\r\ncontent-length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()
        self.received.set()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def _sampled_ctx() -> RequestContext:
    ctx = _ctx(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
    TraceStage().on_request(ctx)
    ctx.upstream_cluster = "outbound|80||echo.local"
    return ctx


def test_sampled_spans_are_exported_in_one_batch_to_the_collector() -> None:
    async def scenario() -> None:
        collector = _Collector()
        await collector.start()
        exporter = OtlpExporter(f"http://127.0.0.1:{collector.port}/v1/traces", interval_s=0.05)
        exporter.start()
        contexts = [_sampled_ctx() for _ in range(3)]
        for ctx in contexts:
            exporter.finish(ctx, 200, "VirtualService/default/echo")
        unsampled = _ctx(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"))
        TraceStage().on_request(unsampled)
        exporter.finish(unsampled, 200, "-")
        async with asyncio.timeout(5):
            await collector.received.wait()
        await exporter.stop()
        await collector.stop()
        spans = collector.bodies[0]["resourceSpans"][0]["scopeSpans"][0]["spans"]
        assert [s["spanId"] for s in spans] == [c.trace.span_id for c in contexts]
        assert all(s["traceId"] == CLIENT_TRACE for s in spans)
        assert all(s["parentSpanId"] == CLIENT_SPAN for s in spans)
        attrs = {a["key"]: a["value"] for a in spans[0]["attributes"]}
        assert attrs["http.response.status_code"] == {"intValue": "200"}
        assert attrs["meshgate.route"] == {"stringValue": "VirtualService/default/echo"}
        resource = collector.bodies[0]["resourceSpans"][0]["resource"]["attributes"]
        assert resource == [{"key": "service.name", "value": {"stringValue": "meshgate"}}]
        assert exporter.exported == 3 and exporter.dropped == 0

    asyncio.run(scenario())


def test_spans_are_dropped_and_counted_when_the_collector_is_down_or_refuses() -> None:
    async def scenario() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead_port = s.getsockname()[1]
        exporter = OtlpExporter(f"http://127.0.0.1:{dead_port}", timeout_s=1.0)
        for _ in range(4):
            exporter.finish(_sampled_ctx(), 200, "-")
        await exporter.stop()
        assert exporter.dropped == 4 and exporter.exported == 0

        collector = _Collector(status=503)
        await collector.start()
        refusing = OtlpExporter(f"http://127.0.0.1:{collector.port}")
        refusing.finish(_sampled_ctx(), 200, "-")
        await refusing.stop()
        await collector.stop()
        assert refusing.dropped == 1 and len(collector.bodies) == 1

    asyncio.run(scenario())


def test_the_queue_is_bounded_and_overflow_is_counted() -> None:
    exporter = OtlpExporter("http://127.0.0.1:9", max_queue=5)
    for _ in range(8):
        exporter.finish(_sampled_ctx(), 200, "-")
    assert len(exporter.queue) == 5
    assert exporter.dropped == 3


# ----------------------------------------------------- fast path after EdgeHeadersStage


def _edge_ctx(*headers: tuple[str, str]) -> RequestContext:
    ctx = _ctx(*headers)
    ctx.head.peer = "10.0.0.1"
    EdgeHeadersStage().on_request(ctx)
    return ctx


def test_edge_stage_notes_whether_any_trace_header_is_present() -> None:
    assert _edge_ctx(("user-agent", "x"), ("x-request-id", "r")).trace_headers is False
    for name in ("traceparent", "b3", "x-b3-traceid", "x-b3-sampled"):
        assert _edge_ctx(("accept", "*/*"), (name, "1")).trace_headers is True, name
    # A trace header the client lists in Connection is stripped first: nothing left.
    hop = _edge_ctx(("connection", "traceparent"), ("traceparent", "00-1-2-01"))
    assert hop.trace_headers is False


def test_request_without_trace_headers_gets_a_fresh_valid_context() -> None:
    for sampling, flag in ((0.0, "0"), (1.0, "1")):
        ctx = _edge_ctx(("user-agent", "x"))
        TraceStage(sampling=sampling).on_request(ctx)
        headers = _headers(ctx)
        parsed = parse_traceparent(headers["traceparent"])
        assert parsed is not None
        trace_id, span_id, sampled = parsed
        assert sampled is (flag == "1") and ctx.trace.sampled is sampled
        assert headers["x-b3-traceid"] == trace_id == ctx.trace.trace_id
        assert headers["x-b3-spanid"] == span_id == ctx.trace.span_id
        assert headers["x-b3-sampled"] == flag
        assert "x-b3-parentspanid" not in headers and ctx.trace.parent_id == ""
        assert len(_all(ctx, "traceparent")) == 1
        # What the edge stage set is kept, and header() sees the new headers.
        assert headers["x-request-id"] and headers["user-agent"] == "x"
        assert ctx.head.header("x-b3-spanid") == span_id


def test_fresh_traces_are_sampled_at_the_configured_rate_with_distinct_ids() -> None:
    stage = TraceStage(sampling=0.25, rnd=random.Random(11))
    decisions = []
    ids = set()
    for _ in range(4000):
        ctx = _edge_ctx()
        stage.on_request(ctx)
        decisions.append(ctx.trace.sampled)
        ids.add(ctx.trace.trace_id)
        ids.add(ctx.trace.span_id)
    assert 0.2 < sum(decisions) / len(decisions) < 0.3
    assert len(ids) == 8000


def test_incoming_context_is_still_continued_after_the_edge_stage() -> None:
    ctx = _edge_ctx(("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"))
    TraceStage(sampling=0.0).on_request(ctx)
    headers = _headers(ctx)
    trace_id, span_id, sampled = parse_traceparent(headers["traceparent"]) or ("", "", False)
    assert trace_id == CLIENT_TRACE and span_id != CLIENT_SPAN and sampled
    assert headers["x-b3-parentspanid"] == CLIENT_SPAN
    assert len(_all(ctx, "traceparent")) == 1


def test_traceparent_parsing_follows_the_w3c_rules_at_the_edges() -> None:
    ids = f"{CLIENT_TRACE}-{CLIENT_SPAN}"
    assert parse_traceparent(f"00-{ids}-01") == (CLIENT_TRACE, CLIENT_SPAN, True)
    assert parse_traceparent(f" 00-{ids.upper()}-00 ") == (CLIENT_TRACE, CLIENT_SPAN, False)
    # A later version may append fields; version 00 may not; version ff is invalid.
    assert parse_traceparent(f"01-{ids}-03-more") == (CLIENT_TRACE, CLIENT_SPAN, True)
    assert parse_traceparent(f"00-{ids}-01-more") is None
    assert parse_traceparent(f"ff-{ids}-01") is None
    assert parse_traceparent(f"00-{'0' * 32}-{CLIENT_SPAN}-01") is None
    assert parse_traceparent(f"00-{CLIENT_TRACE}-{'0' * 16}-01") is None
    assert parse_traceparent(f"00-{ids}-1") is None
    assert parse_traceparent(f"00-{CLIENT_TRACE}g-{CLIENT_SPAN}-01") is None
    assert parse_traceparent(f"00-{ids}-01x") is None
