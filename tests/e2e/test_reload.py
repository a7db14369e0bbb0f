"""Hot reload under load, with real ``meshgate`` processes and real HTTP/1.1 and HTTP/2
clients: 20 configuration changes (valid and invalid alternating) while keep-alive
clients hammer the gateway; not one request may fail or see a mix of two configs."""

from __future__ import annotations

import hashlib
import http.client
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import Backend, Gateway, free_ports

from gateway.demo_backend import pattern_bytes

SERVICE_ENTRIES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: a, namespace: default}}
spec:
  hosts: [a.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {a}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: b, namespace: default}}
spec:
  hosts: [b.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {b}}}}}]
"""

ROUTES = """
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:{servers}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
  - name: all
    {bogus}route:
    - destination: {{host: {backend}.local}}
      headers:
        request: {{set: {{x-config-version: "{version}"}}}}
        response: {{set: {{x-config-version: "{version}"}}}}
"""


def backend_for(version: int) -> str:
    """Versions 0, 1, 4, 5, 8, 9... route to backend a, the others to b, so that the
    valid versions (0 and the odd ones) alternate between backends: a half-applied
    config would pair a version with the wrong backend."""
    return "a" if (version // 2) % 2 == 0 else "b"


def _other(backend: str) -> str:
    return "b" if backend == "a" else "a"


@dataclass
class Stack:
    port: int
    admin: int
    backends: dict[str, Backend]
    config_dir: Path
    gateway: Gateway | None = None
    extra_ports: list[int] = field(default_factory=list)

    def write(self, version: int, valid: bool = True, ports: tuple[int, ...] = ()) -> None:
        servers = "".join(
            f"\n  - port: {{number: {p}, name: http-{p}, protocol: HTTP}}\n    hosts: ['*']"
            for p in (self.port, *ports)
        )
        text = ROUTES.format(
            servers=servers,
            # An unknown field makes the whole configuration invalid; it also flips
            # the backend, so applying it even in part would show.
            bogus="bogus: 1\n    " if not valid else "",
            backend=backend_for(version) if valid else _other(backend_for(version)),
            version=version,
        )
        target = self.config_dir / "routes.yaml"
        scratch = self.config_dir / ".routes.yaml.tmp"
        scratch.write_text(text)
        os.replace(scratch, target)  # atomic, as a ConfigMap update is

    def start(self, *extra: str) -> Gateway:
        self.gateway = ReloadGateway(self.config_dir, self.admin, *extra)
        return self.gateway

    def admin_json(self, path: str) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.admin}{path}", timeout=5).json()


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    port, admin, a, b, extra = free_ports(5)
    backends = {"a": Backend(a, "a"), "b": Backend(b, "b")}
    (tmp_path / "services.yaml").write_text(SERVICE_ENTRIES.format(a=a, b=b))
    s = Stack(port, admin, backends, tmp_path, extra_ports=[extra])
    s.write(0)
    try:
        yield s
    finally:
        if s.gateway is not None and s.gateway.proc.poll() is None:
            s.gateway.stop(signal.SIGKILL)
        for backend in backends.values():
            backend.stop()


class ReloadGateway(Gateway):
    """A gateway process that is killed if it never comes up (no stray processes)."""

    def __init__(self, config_dir: Path, admin_port: int, *extra: str) -> None:
        try:
            super().__init__(config_dir, admin_port, *extra)
        except BaseException:
            if hasattr(self, "proc") and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            raise


def wait_lines(gateway: Gateway, pred: Callable[[str], bool], count: int, timeout_s=20.0) -> None:
    """Wait until ``count`` stderr lines match (one per worker when several reload)."""
    deadline = time.monotonic() + timeout_s
    with gateway._cond:
        while sum(1 for line in gateway.stderr if pred(line)) < count:
            left = deadline - time.monotonic()
            if left <= 0 or gateway.proc.poll() is not None:
                raise TimeoutError("".join(gateway.stderr)[-3000:])
            gateway._cond.wait(left)


class Load:
    """Keep-alive clients, each in its own thread, checking every response."""

    def __init__(self, port: int, valid_versions: set[int]) -> None:
        self.port = port
        self.valid = valid_versions
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.counts: dict[str, int] = {}
        self.seen_versions: set[int] = set()
        self.threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self, http1: int, http2: int) -> None:
        for i in range(http1):
            self._spawn(f"h1-{i}", httpx.Client(timeout=10))
        for i in range(http2):
            self._spawn(f"h2-{i}", httpx.Client(timeout=10, http1=False, http2=True))

    def _spawn(self, name: str, client: httpx.Client) -> None:
        thread = threading.Thread(target=self._run, args=(name, client), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _run(self, name: str, client: httpx.Client) -> None:
        last = -1
        n = 0
        with client:
            while not self.stop.is_set():
                path = f"/{name}/{n}"
                try:
                    response = client.get(f"http://127.0.0.1:{self.port}{path}")
                    problem = self._check(response, path, last)
                    if problem is None:
                        last = int(response.headers["x-config-version"])
                except Exception as exc:
                    problem = f"{path}: {exc!r}"
                with self._lock:
                    if problem is not None:
                        self.failures.append(problem)
                    else:
                        self.seen_versions.add(last)
                    self.counts[name] = self.counts.get(name, 0) + 1
                n += 1

    def _check(self, response: httpx.Response, path: str, last: int) -> str | None:
        if response.status_code != 200:
            return f"{path}: status {response.status_code}"
        version = int(response.headers["x-config-version"])
        echoed = response.json()
        if version not in self.valid:
            return f"{path}: version {version} was never valid"
        if echoed["headers"].get("x-config-version") != str(version):
            return f"{path}: response says {version}, request said {echoed['headers']}"
        if response.headers["x-served-by"] != backend_for(version):
            return f"{path}: version {version} served by {response.headers['x-served-by']}"
        if echoed["path"] != path:
            return f"{path}: backend saw {echoed['path']}"
        if version < last:
            return f"{path}: version went back from {last} to {version}"
        return None

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(15)


def test_twenty_reloads_under_load_fail_no_request_and_never_mix_configs(stack: Stack) -> None:
    gateway = stack.start("--reload-interval-s", "0.05")
    base = f"http://127.0.0.1:{stack.port}"
    # Opened before any change: a keep-alive HTTP/1.1 connection and a long,
    # slowly read HTTP/2 download (flow control holds the rest at the gateway).
    keep_alive = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    keep_alive.request("GET", "/before")
    first = keep_alive.getresponse()
    assert first.status == 200 and first.getheader("x-config-version") == "0"
    first.read()
    keep_alive_socket = keep_alive.sock
    total = 24 * 1024 * 1024
    long_client = httpx.Client(timeout=30, http1=False, http2=True)
    long_cm = long_client.stream("GET", f"{base}/long?bytes={total}")
    long_response = long_cm.__enter__()
    assert long_response.http_version == "HTTP/2"
    chunks = long_response.iter_raw(16384)
    digest = hashlib.sha256()
    received = 0

    def read_some() -> None:
        nonlocal received
        data = next(chunks)
        digest.update(data)
        received += len(data)

    read_some()

    valid_versions = {0} | {v for v in range(1, 21) if v % 2 == 1}
    load = Load(stack.port, valid_versions)
    load.start(http1=3, http2=2)
    try:
        for version in range(1, 21):
            valid = version % 2 == 1
            stack.write(version, valid)
            outcome = "applied" if valid else "rejected"
            wait_lines(
                gateway, lambda ln, v=version, o=outcome: f"reload #{v} " in ln and o in ln, 1
            )
            dump = stack.admin_json("/config_dump")
            if valid:
                response = httpx.get(f"{base}/check/{version}", timeout=5)
                assert response.headers["x-config-version"] == str(version)
                assert dump["reload"]["errors"] == []
            else:
                assert dump["reload"]["lastResult"] == "rejected"
                assert any(
                    "routes.yaml:" in e and 'unknown field "bogus"' in e
                    for e in dump["reload"]["errors"]
                ), dump["reload"]["errors"]
            assert dump["version"] == dump["reload"]["version"]
            read_some()  # the long stream moves on a little after every change
    finally:
        load.finish()

    print("requests per client:", load.counts, "versions seen:", sorted(load.seen_versions))
    assert load.failures == [], load.failures[:10]
    assert all(count > 5 for count in load.counts.values()), load.counts
    assert len(load.seen_versions) >= 5, load.seen_versions  # it really ran across reloads
    reload = stack.admin_json("/config_dump")["reload"]
    assert (reload["applied"], reload["rejected"]) == (10, 10)

    # The connections opened before the changes are still the same connections.
    keep_alive.request("GET", "/after")
    after = keep_alive.getresponse()
    assert after.status == 200 and after.getheader("x-config-version") == "19"
    after.read()
    assert keep_alive.sock is keep_alive_socket
    for data in chunks:
        digest.update(data)
        received += len(data)
    long_cm.__exit__(None, None, None)
    long_client.close()
    assert received == total
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(total)).hexdigest()
    keep_alive.close()
    assert gateway.stop(signal.SIGTERM) == 0


def test_identical_configuration_changes_nothing(stack: Stack) -> None:
    gateway = stack.start("--reload-interval-s", "0.05")
    before = stack.admin_json("/config_dump")
    # The same content in a new file (new inode and mtime), then a bare SIGHUP.
    stack.write(0)
    wait_lines(gateway, lambda ln: "reload #1 (file change) unchanged" in ln, 1)
    gateway.proc.send_signal(signal.SIGHUP)
    wait_lines(gateway, lambda ln: "reload #2 (SIGHUP) unchanged" in ln, 1)
    after = stack.admin_json("/config_dump")
    assert after["version"] == before["version"]
    assert after["reload"]["applied"] == 0 and after["reload"]["unchanged"] == 2
    assert gateway.stop(signal.SIGTERM) == 0


def test_sighup_reloads_when_polling_is_off(stack: Stack) -> None:
    gateway = stack.start("--reload-interval-s", "0")
    stack.write(1)
    response = httpx.get(f"http://127.0.0.1:{stack.port}/x", timeout=5)
    assert response.headers["x-config-version"] == "0"  # not watched: nothing happened
    gateway.proc.send_signal(signal.SIGHUP)
    wait_lines(gateway, lambda ln: "reload #1 (SIGHUP) applied" in ln, 1)
    response = httpx.get(f"http://127.0.0.1:{stack.port}/x", timeout=5)
    assert response.headers["x-config-version"] == "1"
    assert response.headers["x-served-by"] == backend_for(1)
    assert gateway.stop(signal.SIGTERM) == 0


def test_reload_binds_added_listener_ports_and_closes_removed_ones(stack: Stack) -> None:
    gateway = stack.start("--reload-interval-s", "0.05")
    extra = stack.extra_ports[0]
    stack.write(1, ports=(extra,))
    wait_lines(gateway, lambda ln: "reload #1 (file change) applied" in ln, 1)
    response = httpx.get(f"http://127.0.0.1:{extra}/new-port", timeout=5)
    assert response.status_code == 200 and response.headers["x-config-version"] == "1"
    stack.write(3)
    wait_lines(gateway, lambda ln: "reload #2 (file change) applied" in ln, 1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{extra}/gone", timeout=5)
    assert httpx.get(f"http://127.0.0.1:{stack.port}/", timeout=5).status_code == 200
    assert gateway.stop(signal.SIGTERM) == 0


def test_every_worker_reloads_on_sighup_to_the_parent(stack: Stack) -> None:
    gateway = stack.start("--workers", "2", "--reload-interval-s", "0")
    stack.write(1)
    gateway.proc.send_signal(signal.SIGHUP)
    # Two workers and the parent's own copy.
    wait_lines(gateway, lambda ln: "reload #1 (SIGHUP) applied" in ln, 3)
    dump = stack.admin_json("/config_dump")
    assert len(dump["workers"]) == 2
    assert {w["version"] for w in dump["workers"]} == {dump["version"]}
    for i in range(10):  # fresh connections, so both workers answer some
        response = httpx.get(f"http://127.0.0.1:{stack.port}/w{i}", timeout=5)
        assert response.headers["x-config-version"] == "1"
    assert gateway.stop(signal.SIGTERM) == 0


def test_sigterm_stops_accepting_and_lets_the_request_in_flight_finish(stack: Stack) -> None:
    gateway = stack.start("--drain-timeout-s", "10")
    result: dict[str, object] = {}

    def slow() -> None:
        try:
            response = httpx.get(f"http://127.0.0.1:{stack.port}/slow?delay_ms=1500", timeout=10)
            result["status"] = response.status_code
        except Exception as exc:
            result["error"] = repr(exc)

    thread = threading.Thread(target=slow)
    thread.start()
    deadline = time.monotonic() + 5
    while True:  # in flight once the gateway holds a connection to the backend
        clusters = stack.admin_json("/clusters")["clusters"]
        if any(e["connections_opened"] for c in clusters for e in c["endpoints"]):
            break
        assert time.monotonic() < deadline, "the slow request never reached the backend"
        time.sleep(0.02)  # polling the admin API: there is no event to wait on
    gateway.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while True:  # the listener closes at once, long before the slow request ends
        try:
            httpx.get(f"http://127.0.0.1:{stack.port}/late", timeout=1)
        except httpx.ConnectError:
            break
        assert time.monotonic() < deadline, "still accepting after SIGTERM"
        time.sleep(0.02)
    assert thread.is_alive()  # refused while the first request was still running
    thread.join(10)
    assert result == {"status": 200}
    assert gateway.proc.wait(15) == 0
