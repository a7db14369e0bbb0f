"""The HTTP/1.1 adapter held to Envoy's codec on hostile and malformed requests, against
a real ``meshgate run`` over raw sockets.

Each refusal is checked the way a client and an operator see it: the status, exactly
one answer before the connection closes, the access-log line (flag ``DPE``, no
upstream) and a backend that never saw the request. Accepted shapes are checked
through the demo backend's echo of what reached it.

Covered elsewhere and not repeated here: the smuggling shapes of
``test_hostile_input.py`` (two Content-Lengths, a Content-Length list, CL+TE, obs-fold,
bad chunk sizes, Transfer-Encodings other than chunked, a space before the colon, a
signed Content-Length) and the 413/431/408 cases of ``test_gateway_routing.py``.
"""

from __future__ import annotations

import hashlib
import json
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_gateway_helpers import Backend, Gateway, free_ports, raw_exchange
from traffic_backends import ScriptedBackend

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: app, namespace: istio-system}}
spec:
  hosts: [app.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: istio-system}}
spec:
  hosts: [echo.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {echo}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: istio-system}}
spec:
  hosts: [echo.local]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: echo.local}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: istio-system}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: app.local}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admins, namespace: istio-system}}
spec:
  action: DENY
  rules:
  - to: [{{operation: {{paths: [/audit/admin]}}}}]
  - when: [{{key: "request.headers[x-role]", values: [admin]}}]
"""

MAX_BODY_BYTES = 1000
MAX_HEAD_BYTES = 4096


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, app, echo = free_ports(4)
        self.app = ScriptedBackend(app, "app")
        self.echo = Backend(echo, "echo")
        (tmp / "config.yaml").write_text(CONFIG.format(port=self.port, app=app, echo=echo))
        self.gateway = Gateway(
            tmp,
            admin,
            "--max-request-header-bytes",
            str(MAX_HEAD_BYTES),
            "--max-request-body-bytes",
            str(MAX_BODY_BYTES),
        )

    def assert_never_forwarded(self, marker: str) -> None:
        """No request carrying ``x-case: marker`` reached the app backend. A request
        sent afterwards on a fresh connection arrives first, so a refused one had
        every chance to get there."""
        sentinel = f"/sentinel-{uuid.uuid4().hex}"
        reply = raw_exchange(
            self.port,
            f"GET {sentinel} HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n\r\n".encode(),
        )
        assert reply.startswith(b"HTTP/1.1 200 ")
        self.app.recorder.wait_for(lambda r: r["path"] == sentinel)
        with self.app.recorder.cond:
            seen = [r for r in self.app.recorder.requests if _header(r, "x-case") == marker]
        assert seen == []


def _header(record: dict, name: str) -> str | None:
    for key, value in record["headers"].items():
        if key.lower() == name:
            return value
    return None


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("h1audit"))
    try:
        yield setup
    finally:
        setup.gateway.stop()
        setup.echo.stop()
        setup.app.stop()


Response = tuple[int, dict[str, str], bytes]


def responses(data: bytes, bodiless: tuple[int, ...] = ()) -> list[Response]:
    """The responses in ``data``, in order: status, headers (lower-case names), body.
    Every response here is framed by Content-Length; those at the indexes in
    ``bodiless`` answer HEAD and carry none."""
    found: list[Response] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"truncated response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        size = 0 if len(found) in bodiless else int(headers.get("content-length", "0"))
        assert len(rest) >= size, f"truncated body: {rest!r}"
        found.append((status, headers, rest[:size]))
        data = rest[size:]
    return found


def echoed(response: Response) -> dict:
    """What the demo backend says it received."""
    status, headers, body = response
    assert (status, headers.get("x-served-by")) == (200, "echo"), body[:300]
    return json.loads(body)


# --------------------------------------------------------------- header values and Host


def test_trailing_whitespace_does_not_slip_a_header_value_past_a_deny_policy(gw: Setup) -> None:
    # llhttp keeps the whitespace after a value; RFC 9110 5.5 says it is not part of
    # it. Kept, "admin " missed the policy's "admin" and reached the upstream, which
    # reads "admin".
    marker = uuid.uuid4().hex
    path = f"/audit/role-{marker}"
    raw = (
        f"GET {path} HTTP/1.1\r\nHost: app.local\r\nX-Role: admin \t\r\nX-Case: {marker}\r\n"
        "Connection: close\r\n\r\n"
    )
    [(status, _, body)] = responses(raw_exchange(gw.port, raw.encode()))
    assert (status, body) == (403, b"RBAC: access denied")
    line = gw.gateway.log_where(lambda r: r.get("path") == path)
    assert (line["status"], line["response_flags"], line["upstream_host"]) == (403, "RBAC", "-")
    gw.assert_never_forwarded(marker)


def test_trailing_whitespace_is_dropped_from_values_and_host_before_routing(gw: Setup) -> None:
    path = f"/audit/ows-{uuid.uuid4().hex}"
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: echo.local \t\r\nX-Note: kept  \r\n"
        "Content-Length: 4 \r\nConnection: close\r\n\r\nabcd"
    )
    [response] = responses(raw_exchange(gw.port, raw.encode()))
    # Routed by "echo.local": with the whitespace the Host matched no VirtualService
    # of its own and went to the catch-all app backend instead.
    seen = echoed(response)
    assert seen["path"] == path
    assert seen["headers"]["host"] == "echo.local"
    assert seen["headers"]["x-note"] == "kept"
    assert seen["headers"]["content-length"] == "4"
    assert seen["body_bytes"] == 4
    line = gw.gateway.log_where(lambda r: r.get("path") == path)
    assert line["authority"] == "echo.local"


# --------------------------------------------------------------------------- refusals

# Each is answered 400 and the connection closed; nothing after it is read. The
# request text takes {m}, a marker unique to the run, and carries it in X-Case.
REFUSED = {
    # A fragment is never part of a request target (RFC 9112 3.2); "/audit/admin#x"
    # missed the DENY rule for "/audit/admin" and reached the backend, which drops
    # the fragment. Envoy refuses it (CVE-2021-32779).
    "fragment-origin-form": "GET /audit/admin#{m} HTTP/1.1\r\nHost: app.local\r\n",
    "fragment-in-query": "GET /audit/q-{m}?a=1#x HTTP/1.1\r\nHost: app.local\r\n",
    "fragment-absolute-form": "GET http://app.local/audit/a-{m}#x HTTP/1.1\r\nHost: app.local\r\n",
    # Asterisk form belongs to OPTIONS (RFC 9112 3.2.4); Envoy: invalid URL, 400.
    "asterisk-form-get": "GET * HTTP/1.1\r\nHost: app.local\r\n",
    # llhttp accepts these versions; neither is HTTP/1.x framing (Envoy: 400).
    "http-2.0-request-line": "GET /audit/v20-{m} HTTP/2.0\r\nHost: app.local\r\n",
    "http-0.9-with-headers": "GET /audit/v09-{m} HTTP/0.9\r\nHost: app.local\r\n",
    # RFC 9112 6.1: Transfer-Encoding in HTTP/1.0 means faulty framing. An HTTP/1.0
    # hop in front reads no body and takes the chunks for a request of their own.
    "http-1.0-transfer-encoding": (
        "POST /audit/te10-{m} HTTP/1.0\r\nHost: app.local\r\nConnection: keep-alive\r\n"
        "Transfer-Encoding: chunked\r\n"
    ),
    # As the HTTP/2 and HTTP/3 adapters refuse them in :authority; Envoy refuses an
    # invalid Host too.
    "host-with-space": "GET /audit/hsp-{m} HTTP/1.1\r\nHost: app local\r\n",
    "host-with-tab": "GET /audit/htab-{m} HTTP/1.1\r\nHost: app\tlocal\r\n",
}
# What follows the head on the wire: a second request that must never be read, or for
# HTTP/1.0 a chunked body that would hide one from an HTTP/1.0 hop.
NEXT = "GET /audit/next-{m} HTTP/1.1\r\nHost: app.local\r\nX-Case: {m}\r\n\r\n"
AFTER = {"http-1.0-transfer-encoding": "4\r\nabcd\r\n0\r\n\r\n" + NEXT}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_malformed_request_gets_400_is_logged_and_never_forwarded(gw: Setup, case: str) -> None:
    marker = uuid.uuid4().hex
    after = AFTER.get(case, NEXT)
    raw = REFUSED[case].format(m=marker) + f"X-Case: {marker}\r\n\r\n" + after.format(m=marker)
    data = raw_exchange(gw.port, raw.encode())
    [(status, headers, _)] = responses(data)
    assert status == 400, data[:300]
    assert headers["connection"] == "close"
    if case == "asterisk-form-get":
        line = gw.gateway.log_where(lambda r: r.get("path") == "*" and r.get("status") == 400)
    else:
        line = gw.gateway.log_where(lambda r: marker in r.get("path", ""))
    assert (line["status"], line["response_flags"], line["upstream_host"]) == (400, "DPE", "-")
    gw.assert_never_forwarded(marker)


def test_expect_continue_with_an_oversized_body_gets_413_without_100(gw: Setup) -> None:
    marker = uuid.uuid4().hex
    path = f"/audit/expect-{marker}"
    raw = (
        f"PUT {path} HTTP/1.1\r\nHost: app.local\r\nContent-Length: {MAX_BODY_BYTES + 1}\r\n"
        f"Expect: 100-continue\r\nX-Case: {marker}\r\n\r\n"
    )
    # The client waits for 100 Continue before sending a byte of the body; the
    # refusal is the only answer, so it never sends it.
    data = raw_exchange(gw.port, raw.encode())
    [(status, headers, _)] = responses(data)
    assert (status, headers["connection"]) == (413, "close")
    line = gw.gateway.log_where(lambda r: r.get("path") == path)
    assert (line["status"], line["response_flags"], line["upstream_host"]) == (413, "DPE", "-")
    gw.assert_never_forwarded(marker)


# --------------------------------------------------------------------------- pipelining

# The malformed third request of a pipelined burst, and the status it gets.
PIPELINED_BAD = {
    "framing-400": (
        "POST /audit/pipe-{m}-3 HTTP/1.1\r\nHost: app.local\r\nContent-Length: 1\r\n"
        "Transfer-Encoding: chunked\r\nX-Case: {m}\r\n\r\n0\r\n\r\n",
        400,
    ),
    "head-431": (
        "GET /audit/pipe-{m}-3 HTTP/1.1\r\nHost: app.local\r\nX-Case: {m}\r\n"
        f"X-Big: {'b' * MAX_HEAD_BYTES}\r\n\r\n",
        431,
    ),
    "body-413": (
        "POST /audit/pipe-{m}-3 HTTP/1.1\r\nHost: app.local\r\nX-Case: {m}\r\n"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\n\r\n",
        413,
    ),
}


@pytest.mark.parametrize("case", sorted(PIPELINED_BAD))
def test_pipelined_requests_before_a_malformed_one_are_answered_then_it_is_refused(
    gw: Setup, case: str
) -> None:
    # As Envoy, which parses one request at a time: the requests before the bad one
    # are answered, the bad one is answered and logged, and nothing after it is read.
    # The 200s used to go out with "connection: close" and the refusal never at all.
    marker = uuid.uuid4().hex
    good = "GET /audit/pipe-{m}-{n} HTTP/1.1\r\nHost: app.local\r\nX-Case: ok-{m}\r\n\r\n"
    bad, status = PIPELINED_BAD[case]
    raw = (
        good.format(m=marker, n=1)
        + good.format(m=marker, n=2)
        + bad.format(m=marker)
        + f"GET /audit/pipe-{marker}-4 HTTP/1.1\r\nHost: app.local\r\nX-Case: {marker}\r\n\r\n"
    )
    answers = responses(raw_exchange(gw.port, raw.encode()))
    assert [a[0] for a in answers] == [200, 200, status]
    assert [a[1].get("connection") for a in answers] == [None, None, "close"]
    seen = gw.app.recorder.wait_for(lambda r: r["path"] == f"/audit/pipe-{marker}-2")
    assert _header(seen, "x-case") == f"ok-{marker}"
    line = gw.gateway.log_where(lambda r: r.get("path") == f"/audit/pipe-{marker}-3")
    assert (line["status"], line["response_flags"], line["upstream_host"]) == (status, "DPE", "-")
    gw.assert_never_forwarded(marker)


def test_pipelined_requests_sent_before_a_half_close_are_all_answered(gw: Setup) -> None:
    marker = uuid.uuid4().hex
    raw = "".join(
        f"GET /audit/half-{marker}-{n} HTTP/1.1\r\nHost: app.local\r\n\r\n" for n in (1, 2, 3)
    )
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(raw.encode())
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):  # bounded by the socket timeout
            chunks.append(chunk)
    answers = responses(b"".join(chunks))
    assert [(a[0], a[2]) for a in answers] == [(200, b"app 200 0")] * 3
    assert [a[1].get("connection") for a in answers] == [None, None, "close"]


# --------------------------------------------------------- accepted, as Envoy accepts them


def test_absolute_form_authority_wins_over_a_disagreeing_host(gw: Setup) -> None:
    # RFC 9112 3.2.2: the target's authority replaces Host; Envoy does the same. The
    # policy, the route and the upstream all see the one authority.
    path = f"/audit/abs-{uuid.uuid4().hex}"
    raw = f"GET http://echo.local{path}?q=1 HTTP/1.1\r\nHost: app.local\r\nConnection: close\r\n"
    raw += "\r\n"
    [response] = responses(raw_exchange(gw.port, raw.encode()))
    seen = echoed(response)
    assert (seen["path"], seen["query"], seen["headers"]["host"]) == (path, "q=1", "echo.local")
    line = gw.gateway.log_where(lambda r: r.get("path") == f"{path}?q=1")
    assert line["authority"] == "echo.local"


def test_chunk_extensions_and_trailers_are_dropped_and_the_body_reframed(gw: Setup) -> None:
    # An extension far over the head limit is skipped as llhttp reads it, never
    # buffered, as Envoy's codec skips it; the trailers are not forwarded (Envoy's
    # default). The upstream gets the body alone, in chunks of meshgate's own.
    path = f"/audit/chunked-{uuid.uuid4().hex}"
    extension = "x" * (16 * MAX_HEAD_BYTES)
    raw = (
        f"POST {path} HTTP/1.1\r\nHost: echo.local\r\nTransfer-Encoding: chunked\r\n"
        f'Connection: close\r\n\r\n4;{extension}\r\nabcd\r\n3;q="a;b"\r\nefg\r\n0\r\n'
        "X-Trailer: t\r\n\r\n"
    )
    [response] = responses(raw_exchange(gw.port, raw.encode()))
    seen = echoed(response)
    assert seen["body_bytes"] == 7
    assert seen["body_sha256"] == hashlib.sha256(b"abcdefg").hexdigest()
    assert seen["headers"]["transfer-encoding"] == "chunked"
    assert "x-trailer" not in seen["headers"]


def test_head_response_has_no_body_and_the_next_pipelined_response_follows(gw: Setup) -> None:
    path = f"/audit/head-{uuid.uuid4().hex}"
    raw = (
        f"HEAD {path} HTTP/1.1\r\nHost: echo.local\r\n\r\n"
        f"GET {path}-next HTTP/1.1\r\nHost: echo.local\r\nConnection: close\r\n\r\n"
    )
    head, after = responses(raw_exchange(gw.port, raw.encode()), bodiless=(0,))
    assert head[0] == 200
    assert int(head[1]["content-length"]) > 0  # the length a GET would have had
    assert echoed(after)["path"] == f"{path}-next"
