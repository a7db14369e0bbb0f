"""Traffic-policy semantics audited against Istio's and Envoy's documentation, through a
real ``meshgate run`` process: what ``reset`` retries, that a body streamed upstream
is never replayed, that the route timeout bounds every try, that ``idleTimeout``
closes idle upstream connections, that retries under consistent hashing stay on the
key's endpoint, and that the route timeout covers the whole response body."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h11
import httpx
import pytest
from test_gateway_helpers import Gateway, free_ports
from traffic_backends import Recorder, ScriptedBackend

CONFIG = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: audit}}
spec:
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: raw, namespace: audit}}
spec:
  hosts: [raw.local, idle.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {raw}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: idle, namespace: audit}}
spec:
  host: idle.local
  trafficPolicy: {{connectionPool: {{http: {{idleTimeout: 300ms}}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: halfdead, namespace: audit}}
spec:
  hosts: [halfdead.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {dead}}}}}
    - {{address: 127.0.0.1, ports: {{http: {slow}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: halfdead, namespace: audit}}
spec:
  host: halfdead.local
  trafficPolicy: {{loadBalancer: {{simple: ROUND_ROBIN}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pair, namespace: audit}}
spec:
  hosts: [pair.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
    - {{address: 127.0.0.1, ports: {{http: {slow}}}}}
    - {{address: 127.0.0.1, ports: {{http: {other}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: pair, namespace: audit}}
spec:
  host: pair.local
  trafficPolicy: {{loadBalancer: {{consistentHash: {{httpHeaderName: x-user}}}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: slow, namespace: audit}}
spec:
  hosts: [slow.local]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {slow}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: audit, namespace: audit}}
spec:
  hosts: [audit.local]
  gateways: [edge]
  http:
    - match: [{{uri: {{prefix: /stale}}}}]
      retries: {{attempts: 2, retryOn: "5xx,reset"}}
      route: [{{destination: {{host: raw.local}}}}]
    - match: [{{uri: {{prefix: /idle}}}}]
      route: [{{destination: {{host: idle.local}}}}]
    - match: [{{uri: {{prefix: /slow-body-retried}}}}]
      timeout: 300ms
      retries: {{attempts: 1, retryOn: connect-failure}}
      route: [{{destination: {{host: raw.local}}}}]
    - match: [{{uri: {{prefix: /slow-body}}}}]
      timeout: 300ms
      route: [{{destination: {{host: raw.local}}}}]
    - match: [{{uri: {{prefix: /reset}}}}]
      retries: {{attempts: 1, retryOn: reset}}
      route: [{{destination: {{host: halfdead.local}}}}]
    - match: [{{uri: {{prefix: /bounded}}}}]
      timeout: 1s
      retries: {{attempts: 10, perTryTimeout: 200ms, retryOn: 5xx}}
      route: [{{destination: {{host: slow.local}}}}]
    - match: [{{uri: {{prefix: /sticky}}}}]
      retries: {{attempts: 2, retryOn: 5xx}}
      route: [{{destination: {{host: pair.local}}}}]
"""

STALE_PREFIX = 100 * 1024  # over the 64 KiB a retry may replay
STALE_REST = 100 * 1024
SLOW_BODY = b"x" * 4000


class RawBackend:
    """An HTTP/1.1 backend (h11, a thread per connection) that records each
    connection's requests and the moment the gateway closes it, and misbehaves on
    purpose by path:

    - ``/stale…``: the first connection serves one request, then closes as soon as
      the bytes of a second request arrive (a keep-alive connection that died while
      idle); ``stale_closed`` is set then;
    - ``/slow-body``: the head and half the body at once, the rest 0.8 s later.
    """

    def __init__(self, port: int) -> None:
        self.recorder = Recorder("raw")
        self.stale_closed = threading.Event()
        self._connections = 0
        self._lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._connections += 1
                number = self._connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        h = h11.Connection(h11.SERVER)
        served = 0
        try:
            while True:
                event = h.next_event()
                if event is h11.NEED_DATA:
                    if number == 1 and served == 1 and self._stale:
                        # Wait for the next request's first bytes, then die unanswered.
                        if conn.recv(65536):
                            conn.close()
                            self.stale_closed.set()
                        return
                    data = conn.recv(65536)
                    if not data:
                        self.recorder.add({"eof": number, "at": time.monotonic()})
                        return
                    h.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    target = event.target.decode()
                    self._stale = target.startswith("/stale")
                    body = b""
                    while True:
                        part = h.next_event()
                        if part is h11.NEED_DATA:
                            h.receive_data(conn.recv(65536))
                        elif isinstance(part, h11.Data):
                            body += part.data
                        else:
                            break
                    self.recorder.add(
                        {"connection": number, "path": target, "body": body, "at": time.monotonic()}
                    )
                    self._answer(h, conn, target)
                    served += 1
                    h.start_next_cycle()
                    continue
                return
        except (OSError, h11.ProtocolError):
            return
        finally:
            conn.close()

    _stale = False

    def _answer(self, h: h11.Connection, conn: socket.socket, target: str) -> None:
        if target.startswith("/slow-body"):
            half = len(SLOW_BODY) // 2
            head = h11.Response(status_code=200, headers=[("content-length", str(len(SLOW_BODY)))])
            conn.sendall(h.send(head) + h.send(h11.Data(data=SLOW_BODY[:half])))
            time.sleep(0.8)  # the upstream being slow mid-body is the behaviour under test
            conn.sendall(h.send(h11.Data(data=SLOW_BODY[half:])) + h.send(h11.EndOfMessage()))
            return
        payload = b"raw"
        head = h11.Response(status_code=200, headers=[("content-length", str(len(payload)))])
        conn.sendall(h.send(head) + h.send(h11.Data(data=payload)) + h.send(h11.EndOfMessage()))

    def stop(self) -> None:
        self.sock.close()


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.port, admin, raw, dead, slow, other = free_ports(6)
        self.raw = RawBackend(raw)
        self.slow = ScriptedBackend(slow, "slow")
        self.other = ScriptedBackend(other, "other")
        config = tmp / "config"
        config.mkdir()
        (config / "config.yaml").write_text(
            CONFIG.format(port=self.port, raw=raw, dead=dead, slow=slow, other=other)
        )
        self.gateway = Gateway(config, admin)
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def request(
        self, method: str, path: str, host: str = "audit.local", **kw: Any
    ) -> tuple[httpx.Response, dict[str, Any]]:
        rid = uuid.uuid4().hex
        headers = {"host": host, "x-request-id": rid, **kw.pop("headers", {})}
        response = self.client.request(method, path, headers=headers, **kw)
        return response, self.gateway.log_for(rid)

    def stop(self) -> None:
        self.client.close()
        self.gateway.stop()
        self.raw.stop()
        self.slow.stop()
        self.other.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("audit"))
    try:
        yield setup
    finally:
        setup.stop()


# --------------------------------------------------------------------------- retries


def test_a_streamed_body_is_not_replayed_when_a_pooled_connection_turns_out_dead(
    gw: Setup,
) -> None:
    # The first request leaves a keep-alive connection in the pool; the backend
    # drops it when the second request starts arriving on it. That request's body
    # outgrew the replay buffer and was being streamed from the client: sending it
    # again would forward only the part meshgate kept, as if it were all of it.
    assert gw.request("GET", "/stale/warm")[0].status_code == 200

    def body() -> Iterator[bytes]:
        yield b"a" * STALE_PREFIX
        # The rest only once the dead connection has swallowed the start.
        assert gw.raw.stale_closed.wait(5), "the backend never saw the second request"
        yield b"b" * STALE_REST

    response, log = gw.request("POST", "/stale/upload", content=body())
    assert response.status_code == 503 and "UR" in log["response_flags"]
    uploads = [r for r in gw.raw.recorder.requests if r.get("path") == "/stale/upload"]
    assert uploads == []  # no truncated copy reached the backend on a new connection


def test_reset_retries_a_connect_failure_on_another_endpoint(gw: Setup) -> None:
    # Envoy's "reset" covers every reset reason, a connection failure included.
    # halfdead.local: round robin over a port nobody listens on and a live backend.
    results = [gw.request("GET", "/reset") for _ in range(4)]
    assert [r.status_code for r, _ in results] == [200] * 4
    assert any("UF" not in log["response_flags"] for _, log in results)


def test_route_timeout_bounds_every_try_together(gw: Setup) -> None:
    # 10 retries of 200 ms each would take 2.2 s; the route's 1 s covers them all.
    before = gw.slow.recorder.paths().count("/bounded")
    started = time.monotonic()
    response, log = gw.request("GET", "/bounded?ms=3000")
    elapsed = time.monotonic() - started
    assert response.status_code == 504 and "UT" in log["response_flags"]
    assert 0.9 <= elapsed < 2.0
    tries = gw.slow.recorder.paths().count("/bounded") - before
    assert 2 <= tries <= 6  # several per-try timeouts, far fewer than 11 tries


def test_retries_under_consistent_hashing_stay_on_the_keys_endpoint(gw: Setup) -> None:
    # Istio gives hashed routes no previous-hosts retry predicate, so a retry keeps
    # the session's endpoint. Every answer here is a 503 (retried twice).
    seen = {"slow": 0, "other": 0}
    for user in ("alice", "bob", "carol", "dave", "erin", "frank"):
        path = f"/sticky/{user}"
        before = {name: getattr(gw, name).recorder.paths().count(path) for name in seen}
        response, log = gw.request("GET", f"{path}?status=503", headers={"x-user": user})
        assert response.status_code == 503 and "URX" in log["response_flags"]
        counts = {
            name: getattr(gw, name).recorder.paths().count(path) - before[name] for name in seen
        }
        # All three tries on one endpoint, none on the other.
        assert sorted(counts.values()) == [0, 3]
        for name, count in counts.items():
            seen[name] += count
    assert seen["slow"] and seen["other"]  # the keys do spread over both endpoints


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize(
    "path",
    [
        "/slow-body",  # the lean path: the body relayed after the callback exchange
        "/slow-body-retried",  # a route with retries: the traffic forwarder
    ],
)
def test_route_timeout_covers_the_whole_response_body(gw: Setup, path: str) -> None:
    # Envoy's route timeout lasts until the whole response is in. The head and half
    # the body arrive at once, the rest 0.8 s later, past the route's 300 ms: the
    # client gets the head, then its stream is cut (HTTP/1.1: the connection closes
    # before Content-Length is reached), and the log says UT.
    rid = uuid.uuid4().hex
    headers = {"host": "audit.local", "x-request-id": rid}
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{gw.port}", timeout=10) as client,
        client.stream("GET", path, headers=headers) as response,
    ):
        assert response.status_code == 200
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in response.iter_raw():
                received += chunk
    assert 0 < len(received) < len(SLOW_BODY)
    log = gw.gateway.log_for(rid)
    assert log["status"] == 200
    assert "UT" in log["response_flags"].split(",")
    assert 250 <= log["duration_ms"] < 800


# --------------------------------------------------------------------------- connection pool


def test_idle_timeout_closes_an_idle_upstream_connection(gw: Setup) -> None:
    response, _ = gw.request("GET", "/idle/once")
    assert response.status_code == 200
    served = gw.raw.recorder.wait_for(lambda r: r.get("path") == "/idle/once")
    closed = gw.raw.recorder.wait_for(lambda r: r.get("eof") == served["connection"])
    # Closed by the gateway once idle for the 300 ms idleTimeout, not straight away.
    assert closed["at"] - served["at"] >= 0.25
