"""Helpers (no tests) for the gateway end-to-end tests: real ``meshgate`` processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MESHGATE = str(Path(sys.executable).with_name("meshgate"))


def free_ports(count: int) -> list[int]:
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_tcp_udp_port() -> int:
    """A port free for TCP and UDP at once: an HTTPS listener also serves HTTP/3."""
    for _ in range(50):
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = int(tcp.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise AssertionError("no port free for both TCP and UDP")


def wait_port(port: int, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)  # polling a port: there is nothing to block on
    raise TimeoutError(f"port {port} did not open within {timeout_s}s")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class Backend:
    """``meshgate demo-backend`` as a process."""

    def __init__(self, port: int, name: str) -> None:
        self.port = port
        self.proc = subprocess.Popen(
            [MESHGATE, "demo-backend", "--port", str(port), "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port(port)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class Gateway:
    """``meshgate run`` as a process; collects its access-log lines from stdout."""

    def __init__(
        self, config_dir: Path, admin_port: int, *extra: str, command: str = "run"
    ) -> None:
        self.proc = subprocess.Popen(
            [MESHGATE, command, str(config_dir), "--admin-port", str(admin_port), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self.stderr: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(
            target=self._read, args=(self.proc.stdout, self.lines), daemon=True
        ).start()
        threading.Thread(
            target=self._read, args=(self.proc.stderr, self.stderr), daemon=True
        ).start()
        self.wait_stderr(lambda line: "serving HTTP" in line)

    def _read(self, pipe: Any, into: list[str]) -> None:
        for raw in pipe:
            with self._cond:
                into.append(raw.decode("utf-8", "replace"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _wait(self, into: list[str], pred: Callable[[str], bool], timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                for line in into:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and into is self.stderr):
                    raise TimeoutError(f"no matching line; stderr: {''.join(self.stderr)[-2000:]}")
                self._cond.wait(left)

    def wait_stderr(self, pred: Callable[[str], bool], timeout_s: float = 20.0) -> str:
        return self._wait(self.stderr, pred, timeout_s)

    def log_where(self, pred: Callable[[dict[str, Any]], bool], timeout_s: float = 10.0) -> dict:
        """The first access-log record that ``pred`` accepts."""

        def accepts(line: str) -> bool:
            try:
                return bool(pred(json.loads(line)))
            except ValueError:
                return False

        return json.loads(self._wait(self.lines, accepts, timeout_s))

    def log_for(self, request_id: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """The access-log record of the request with this ``x-request-id``."""
        line = self._wait(self.lines, lambda ln: f'"request_id":"{request_id}"' in ln, timeout_s)
        return json.loads(line)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise


def one_backend_config(port: int, backend_port: int, host: str = "app.local") -> str:
    """The smallest gateway config: an HTTP server on ``port`` for every host, and a
    catch-all route to one static backend on ``backend_port`` named ``host``."""
    return f"""
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
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: app, namespace: istio-system}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: {host}}}}}]}}]
"""


def raw_exchange(port: int, data: bytes, timeout_s: float = 5.0, until_close: bool = True) -> bytes:
    """Send bytes on a fresh socket and read until the server closes (bounded)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not until_close:
                break
        return b"".join(chunks)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
