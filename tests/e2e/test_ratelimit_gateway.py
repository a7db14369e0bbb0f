"""Rate limits through real ``meshgate run`` processes, a demo backend and redis-server:
exact counts and headers, workers sharing one local limit, two gateways sharing one
Redis, Redis killed and restarted under load, fail open and fail closed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis_server import RedisServer, redis_server
from test_gateway_helpers import Backend, Gateway, free_ports

__all__ = ["redis_server"]

CONFIG = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {echo}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: shop}}
spec:
  selector: {{istio: ingressgateway}}
  servers: [{{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: ["*"]}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: shop, namespace: shop}}
spec:
  hosts: [shop.local]
  gateways: [edge]
  http:
    - name: local
      match: [{{uri: {{prefix: /local}}}}]
      route: [{{destination: {{host: echo.local}}}}]
    - name: keyed
      match: [{{uri: {{prefix: /keyed}}}}]
      route: [{{destination: {{host: echo.local}}}}]
    - name: open
      match: [{{uri: {{prefix: /open}}}}]
      route: [{{destination: {{host: echo.local}}}}]
    - name: closed
      match: [{{uri: {{prefix: /closed}}}}]
      route: [{{destination: {{host: echo.local}}}}]
    - name: free
      route: [{{destination: {{host: echo.local}}}}]
---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: local, namespace: shop}}
spec:
  routes: [local]
  limits:
  - name: all
    rate: {{requests: 5, per: hour}}
---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: keyed, namespace: shop}}
spec:
  routes: [keyed]
  responseHeaders: x-ratelimit
  limits:
  - name: per-key
    key: ["request.headers[x-api-key]"]
    rate: {{requests: 2, per: minute}}
    overrides:
    - when: {{"request.headers[x-tier]": gold}}
      rate: {{requests: 4, per: minute}}
"""

REDIS_LIMITS = """
---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: global, namespace: shop}}
spec:
  routes: [open]
  limits:
  - name: open
    key: ["route.name"]
    rate: {{requests: {open_limit}, per: hour}}
    backend: redis
    failureMode: open
---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: strict, namespace: shop}}
spec:
  routes: [closed]
  limits:
  - name: closed
    key: ["route.name"]
    rate: {{requests: {closed_limit}, per: hour}}
    backend: redis
    failureMode: closed
"""


@pytest.fixture
def backend() -> Iterator[Backend]:
    (port,) = free_ports(1)
    echo = Backend(port, "echo")
    try:
        yield echo
    finally:
        echo.stop()


def _write_config(tmp_path: Path, port: int, echo: int, redis: bool = False, **limits: int) -> Path:
    text = CONFIG.format(port=port, echo=echo)
    if redis:
        text += REDIS_LIMITS.format(**{"open_limit": 6, "closed_limit": 6, **limits})
    (tmp_path / "config.yaml").write_text(text)
    return tmp_path


def _get(port: int, path: str, **headers: str) -> httpx.Response:
    return httpx.get(
        f"http://127.0.0.1:{port}{path}", headers={"host": "shop.local", **headers}, timeout=5
    )


def test_local_limit_allows_exactly_its_burst_with_headers_then_429(
    tmp_path: Path, backend: Backend
) -> None:
    port, admin = free_ports(2)
    gateway = Gateway(_write_config(tmp_path, port, backend.port), admin)
    try:
        seen = [_get(port, "/local") for _ in range(6)]
        assert [r.status_code for r in seen] == [200] * 5 + [429]
        assert [r.headers["ratelimit-remaining"] for r in seen[:5]] == ["4", "3", "2", "1", "0"]
        assert all(r.headers["ratelimit-limit"] == "5" for r in seen)
        refused = seen[5]
        # 5 per hour: one request every 720 s.
        assert 719 <= int(refused.headers["retry-after"]) <= 720
        assert 3599 <= int(refused.headers["ratelimit-reset"]) <= 3600
        assert refused.text == "rate limited"
        # A route without a policy carries no rate-limit headers at all.
        free = _get(port, "/other")
        assert free.status_code == 200 and "ratelimit-limit" not in free.headers
        metrics = httpx.get(f"http://127.0.0.1:{admin}/metrics", timeout=5).text
        assert 'meshgate_ratelimit_requests_total{result="allowed"} 5' in metrics
        assert 'meshgate_ratelimit_requests_total{result="limited"} 1' in metrics
        assert "meshgate_ratelimit_local_evictions_total 0" in metrics
    finally:
        gateway.stop()


def test_the_access_log_flags_a_refused_request_rl(tmp_path: Path, backend: Backend) -> None:
    port, admin = free_ports(2)
    gateway = Gateway(_write_config(tmp_path, port, backend.port), admin)
    try:
        for i in range(6):
            status = _get(port, "/local", **{"x-request-id": f"rl-{i}"}).status_code
            assert status == (200 if i < 5 else 429)
        assert gateway.log_for("rl-5")["response_flags"] == "RL"
        assert gateway.log_for("rl-4")["response_flags"] == "-"
    finally:
        gateway.stop()


def test_keys_overrides_and_the_missing_bucket(tmp_path: Path, backend: Backend) -> None:
    port, admin = free_ports(2)
    gateway = Gateway(_write_config(tmp_path, port, backend.port), admin)
    try:

        def codes(n: int, **headers: str) -> list[int]:
            return [_get(port, "/keyed", **headers).status_code for _ in range(n)]

        assert codes(3, **{"x-api-key": "alice"}) == [200, 200, 429]
        assert codes(3, **{"x-api-key": "bob"}) == [200, 200, 429]
        # The gold tier gets its own, larger bucket.
        assert codes(5, **{"x-api-key": "carol", "x-tier": "gold"}) == [200] * 4 + [429]
        # No key at all: one shared bucket, not a way around the limit.
        assert codes(3) == [200, 200, 429]
        response = _get(port, "/keyed", **{"x-api-key": "dave"})
        assert response.headers["x-ratelimit-limit"] == "2"
        assert response.headers["x-ratelimit-remaining"] == "1"
        assert "ratelimit-limit" not in response.headers
    finally:
        gateway.stop()


def test_workers_enforce_one_local_limit_for_the_gateway(tmp_path: Path, backend: Backend) -> None:
    port, admin = free_ports(2)
    gateway = Gateway(_write_config(tmp_path, port, backend.port), admin, "--workers", "3")
    try:

        async def burst() -> list[int]:
            # Fresh connections, so SO_REUSEPORT spreads them over the workers.
            async def one() -> int:
                async with httpx.AsyncClient(timeout=5) as client:
                    r = await client.get(
                        f"http://127.0.0.1:{port}/local", headers={"host": "shop.local"}
                    )
                    return r.status_code

            return list(await asyncio.gather(*(one() for _ in range(30))))

        statuses = asyncio.run(burst())
        assert statuses.count(200) == 5
        assert statuses.count(429) == 25
    finally:
        gateway.stop()


def test_a_redis_limit_without_a_redis_url_refuses_to_start(
    tmp_path: Path, backend: Backend
) -> None:
    port, admin = free_ports(2)
    import subprocess

    from test_gateway_helpers import MESHGATE

    config = _write_config(tmp_path, port, backend.port, redis=True)
    done = subprocess.run(
        [MESHGATE, "run", str(config), "--admin-port", str(admin)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1
    assert "shop/global/open" in done.stderr and "--redis-url" in done.stderr


def test_two_gateways_share_one_redis_limit(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    port_a, admin_a, port_b, admin_b = free_ports(4)
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    dir_a.mkdir()
    dir_b.mkdir()
    # A generous bound: a decision that timed out would fail open and spoil the count.
    url = ["--redis-url", redis_server.url, "--redis-timeout-ms", "5000"]
    a = Gateway(
        _write_config(dir_a, port_a, backend.port, redis=True, open_limit=10), admin_a, *url
    )
    b = Gateway(
        _write_config(dir_b, port_b, backend.port, redis=True, open_limit=10), admin_b, *url
    )
    try:
        statuses = []
        for i in range(16):
            statuses.append(_get(port_a if i % 2 else port_b, "/open").status_code)
        assert statuses.count(200) == 10
        assert statuses[10:] == [429] * 6
    finally:
        a.stop()
        b.stop()


def test_redis_killed_mid_load_fails_open_or_closed_then_limits_resume(
    tmp_path: Path, backend: Backend, redis_server: RedisServer
) -> None:
    port, admin = free_ports(2)
    config = _write_config(tmp_path, port, backend.port, redis=True, open_limit=3, closed_limit=3)
    gateway = Gateway(config, admin, "--redis-url", redis_server.url, "--redis-timeout-ms", "200")
    try:
        # Under the limit (a key Redis already refused stays refused locally until
        # its retry time, Redis or not: that refusal cannot become wrong).
        assert [_get(port, "/open").status_code for _ in range(2)] == [200, 200]
        assert [_get(port, "/closed").status_code for _ in range(2)] == [200, 200]
        redis_server.kill()
        started = time.monotonic()
        opened = [_get(port, "/open") for _ in range(5)]
        closed = [_get(port, "/closed") for _ in range(5)]
        elapsed = time.monotonic() - started
        # Fail open: traffic flows (unlimited, and without figures it cannot know).
        assert [r.status_code for r in opened] == [200] * 5
        assert "ratelimit-remaining" not in opened[0].headers
        # Fail closed: 503 with retry-after, never a hang.
        assert [r.status_code for r in closed] == [503] * 5
        assert closed[0].headers["retry-after"] == "1"
        assert elapsed < 5.0
        gateway.wait_stderr(lambda line: "applying each limit's failureMode" in line)

        redis_server.start()  # empty: the buckets start full again
        deadline = time.monotonic() + 10
        while _get(port, "/closed").status_code == 503:
            assert time.monotonic() < deadline, "limits did not resume after Redis came back"
        gateway.wait_stderr(lambda line: "answers again" in line)
        # The request that found Redis back spent a token: two more pass, then 429.
        assert [_get(port, "/closed").status_code for _ in range(3)] == [200, 200, 429]
    finally:
        gateway.stop()
