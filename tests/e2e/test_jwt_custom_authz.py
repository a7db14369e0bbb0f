"""AuthorizationPolicy CUSTOM through a real ``meshgate run``: an external HTTP
authorizer on 127.0.0.1 allows (2xx), refuses (its answer goes to the client), or
hangs (the gateway fails closed with 403); CUSTOM is consulted before DENY."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway_helpers import Gateway, free_ports
from test_jwt_gateway import Upstream

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
  hosts: [app.internal]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {upstream}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: istio-system}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: app.internal}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ext, namespace: istio-system}}
spec:
  action: CUSTOM
  provider: {{name: checker}}
  rules: [{{to: [{{operation: {{paths: ["/guarded/*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ghost, namespace: istio-system}}
spec:
  action: CUSTOM
  provider: {{name: not-configured}}
  rules: [{{to: [{{operation: {{paths: ["/ghost/*"]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-secrets, namespace: istio-system}}
spec:
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/guarded/secret"]}}}}]}}]
"""


class Authorizer:
    """Allows ``x-allow: yes``; hangs on paths containing ``slow``; else 401."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                owner.calls.append({"path": self.path, "method": self.command, "headers": headers})
                if "slow" in self.path:
                    owner.release.wait(10)  # longer than the gateway's 2 s check timeout
                if self.headers.get("x-allow") == "yes":
                    self.send_response(200)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = b"denied by the checker"
                self.send_response(401)
                self.send_header("x-reason", "no-allow-header")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Env:
    def __init__(self, tmp: Path) -> None:
        self.upstream = Upstream("app")
        self.authorizer = Authorizer()
        port, admin = free_ports(2)
        config = tmp / "config"
        config.mkdir()
        (config / "all.yaml").write_text(CONFIG.format(port=port, upstream=self.upstream.port))
        self.gateway = Gateway(
            config,
            admin,
            "--authz-provider",
            f"checker=http://127.0.0.1:{self.authorizer.port}/check",
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def get(self, path: str, **headers: str) -> httpx.Response:
        return self.client.get(path, headers={"x-request-id": uuid.uuid4().hex, **headers})

    def close(self) -> None:
        self.client.close()
        self.gateway.stop()
        self.authorizer.stop()
        self.upstream.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("custom-authz"))
    yield environment
    environment.close()


def test_paths_no_custom_policy_matches_skip_the_authorizer(env: Env) -> None:
    calls = len(env.authorizer.calls)
    assert env.get("/open").status_code == 200
    assert len(env.authorizer.calls) == calls


def test_authorizer_2xx_allows_and_sees_method_path_and_headers(env: Env) -> None:
    response = env.get("/guarded/a?x=1", **{"x-allow": "yes"})
    assert response.status_code == 200
    call = env.authorizer.calls[-1]
    assert call["path"] == "/check/guarded/a?x=1" and call["method"] == "GET"
    assert call["headers"]["x-allow"] == "yes"


def test_authorizer_refusal_is_returned_to_the_client(env: Env) -> None:
    before = env.upstream.count()
    response = env.get("/guarded/a")
    assert response.status_code == 401
    assert response.text == "denied by the checker"
    assert response.headers["x-reason"] == "no-allow-header"
    assert env.upstream.count() == before
    record = env.gateway.log_for(response.request.headers["x-request-id"])
    assert "UAEX" in record["response_flags"]


def test_custom_is_consulted_before_deny(env: Env) -> None:
    calls = len(env.authorizer.calls)
    response = env.get("/guarded/secret", **{"x-allow": "yes"})
    assert len(env.authorizer.calls) == calls + 1  # asked first ...
    assert response.status_code == 403  # ... then DENY still applies
    assert response.text == "RBAC: access denied"


def test_authorizer_timeout_fails_closed(env: Env) -> None:
    before = env.upstream.count()
    started = time.monotonic()
    response = env.get("/guarded/slow", **{"x-allow": "yes"})
    assert response.status_code == 403
    assert time.monotonic() - started < 8  # the gateway's own timeout, not the authorizer's
    assert env.upstream.count() == before


def test_custom_provider_without_a_url_denies(env: Env) -> None:
    before = env.upstream.count()
    assert env.get("/ghost/x").status_code == 403
    assert env.upstream.count() == before


def test_decisions_are_counted_in_metrics(env: Env) -> None:
    env.get("/guarded/a", **{"x-allow": "yes"})
    admin = env.gateway.proc.args[env.gateway.proc.args.index("--admin-port") + 1]
    text = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith("meshgate_authz_decisions_total")]
    decisions = {ln.rsplit(" ", 1)[0]: int(ln.rsplit(" ", 1)[1]) for ln in lines}
    allow = (
        'meshgate_authz_decisions_total{decision="allow",action="CUSTOM",policy="istio-system/ext"}'
    )
    assert decisions[allow] >= 1
