"""The chart mounts its ConfigMap as a whole directory (no subPath) and relies on
meshgate's hot reload to pick up `helm upgrade`. This runs a real ``meshgate run``
on a directory laid out the way the kubelet lays out a ConfigMap volume and updates
it the way the kubelet does, then checks the new configuration is served.

The kubelet's layout (its AtomicWriter): the data sits in a timestamped hidden
directory, ``..data`` is a symlink to it, and each key is a symlink through
``..data``. An update writes a new timestamped directory, points ``..data_tmp`` at
it and renames ``..data_tmp`` over ``..data``: one atomic switch of every file.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

MESHGATE = str(Path(sys.executable).with_name("meshgate"))
ADMIN_ADDRESS = "127.0.0.2"

CONFIG = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {port}, name: http, protocol: HTTP}}
      hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: hello}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
    - directResponse: {{status: 200, body: {{string: "{body}"}}}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubelet_write(volume: Path, files: dict[str, str], generation: int) -> None:
    """Write ``files`` into ``volume`` the way the kubelet updates a ConfigMap volume."""
    data_dir = volume / f"..2026_01_01_00_00_0{generation}.{os.getpid()}"
    data_dir.mkdir()
    for name, text in files.items():
        (data_dir / name).write_text(text)
    tmp_link = volume / "..data_tmp"
    tmp_link.symlink_to(data_dir.name)
    os.replace(tmp_link, volume / "..data")
    for name in files:
        link = volume / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


class Lines:
    """A process's stderr lines, read on a thread so the test can wait with a deadline."""

    def __init__(self, stream) -> None:  # type: ignore[no-untyped-def]
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._pump, args=(stream,), daemon=True).start()

    def _pump(self, stream) -> None:  # type: ignore[no-untyped-def]
        for raw in stream:
            self.lines.put(raw.decode(errors="replace").rstrip())

    def wait_for(self, needle: str, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(line)
            if needle in line:
                return line
        seen = "\n".join(self.seen)
        raise AssertionError(f"no line with {needle!r} in {timeout_s}s; saw:\n{seen}")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Path, int, int, Lines]]:
    port, admin = free_port(), free_port()
    volume = tmp_path / "config"
    volume.mkdir()
    kubelet_write(volume, {"config.yaml": CONFIG.format(port=port, body="one")}, 1)
    proc = subprocess.Popen(
        [
            MESHGATE,
            "run",
            str(volume),
            "--admin-port",
            str(admin),
            # Another loopback address than the listener's: shows --admin-address is
            # honoured (the chart passes 0.0.0.0) without leaving the loopback network.
            "--admin-address",
            ADMIN_ADDRESS,
            "--reload-interval-s",
            "0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    lines = Lines(proc.stderr)
    try:
        lines.wait_for("serving HTTP", 20)
        yield volume, port, admin, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_atomic_configmap_update_is_hot_reloaded(
    gateway: tuple[Path, int, int, Lines],
) -> None:
    volume, port, _, lines = gateway
    url = f"http://127.0.0.1:{port}/"
    assert httpx.get(url, timeout=5).text == "one"
    # The key's symlink (config.yaml -> ..data/config.yaml) never changes: only ..data
    # does, so meshgate must look through the link to see the update.
    kubelet_write(volume, {"config.yaml": CONFIG.format(port=port, body="two")}, 2)
    lines.wait_for("applied version", 20)
    assert httpx.get(url, timeout=5).text == "two"
    # The hidden timestamped directories are not read as configuration of their own.
    assert not any("..20" in line and "error" in line for line in lines.seen)


def test_admin_api_binds_the_address_it_is_given(gateway: tuple[Path, int, int, Lines]) -> None:
    _, _, admin, _ = gateway
    ready = httpx.get(f"http://{ADMIN_ADDRESS}:{admin}/healthz/ready", timeout=5)
    assert ready.status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{admin}/healthz/ready", timeout=5)
