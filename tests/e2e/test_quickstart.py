"""``python -m gateway.quickstart`` end to end: demo backends, the gateway, the routes.

Runs the quickstart as a real process on free ports (remapped through the
environment), tries what it prints, and stops it with SIGTERM, checking that no
process it started outlives it.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import re
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

from gateway.config.load import load_config
from gateway.quickstart import Backend, find_backends, gateway_ports, parse_port_map, remap_ports

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart"
START_TIMEOUT_S = 30.0
SPLIT_REQUESTS = 400


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from each process's parent in /proc."""
    parents: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                text = stat.read()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        parents[parent].append(int(entry))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(parents.get(pid, ()))
    return tree


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


class Quickstart:
    def __init__(self) -> None:
        self.gateway_port, v1, v2, self.admin_port = _free_ports(4)
        env = dict(os.environ)
        env["MESHGATE_QUICKSTART_PORTS"] = f"8080={self.gateway_port},9081={v1},9082={v2}"
        env["MESHGATE_QUICKSTART_ADMIN_PORT"] = str(self.admin_port)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway.quickstart", "examples/quickstart/"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.gateway_port}"

    def _drain(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    def wait_for_line(self, pattern: str) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r}; output:\n{''.join(self.output)}")

    def wait_until_serving(self, client: httpx.Client) -> None:
        """Poll the gateway's /healthz (a direct response) until it answers, bounded."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                if client.get("/healthz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a port: there is nothing to block on
        raise AssertionError(f"gateway never served /healthz; output:\n{''.join(self.output)}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(20)
        except subprocess.TimeoutExpired:
            for pid in reversed(_process_tree(self.process.pid)):
                os.kill(pid, signal.SIGKILL)
            self.process.wait(5)
            raise AssertionError("quickstart did not stop within 20 s of SIGTERM") from None


def test_backends_come_from_the_service_entry_endpoints() -> None:
    assert find_backends(EXAMPLE) == [
        Backend(name="echo-v1", address="127.0.0.1", port=9081),
        Backend(name="echo-v2", address="127.0.0.1", port=9082),
    ]
    assert gateway_ports(EXAMPLE) == [8080]


def test_port_map_parses_old_equals_new_pairs() -> None:
    assert parse_port_map("8080=18080, 9081=19081") == {8080: 18080, 9081: 19081}
    assert parse_port_map("") == {}
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_port_map("8080:18080")


def test_remapped_config_moves_listener_and_endpoints_and_stays_valid(tmp_path: Path) -> None:
    remap_ports(EXAMPLE, {8080: 18080, 9081: 19081, 9082: 19082}, tmp_path)
    assert gateway_ports(tmp_path) == [18080]
    assert [b.port for b in find_backends(tmp_path)] == [19081, 19082]
    model = load_config([str(tmp_path)])
    assert len(model.resources) == 4
    assert not model.warnings


@pytest.fixture(scope="module")
def quickstart() -> Iterator[Quickstart]:
    started = Quickstart()
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def client(quickstart: Quickstart) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=quickstart.base, timeout=10.0) as http:
        quickstart.wait_until_serving(http)
        yield http


def test_printed_commands_name_the_gateway_port(
    quickstart: Quickstart, client: httpx.Client
) -> None:
    printed = "".join(quickstart.output)
    assert f"curl -si {quickstart.base}/api/items" in printed
    assert f"curl -si -H 'x-canary: true' {quickstart.base}/" in printed
    assert f"curl -si {quickstart.base}/ | grep -i '^x-served-by'" in printed


def test_prefix_route_goes_to_v1_with_the_rewrite(client: httpx.Client) -> None:
    response = client.get("/api/items", params={"id": "3"})
    assert response.status_code == 200
    assert response.headers["x-served-by"] == "echo-v1"
    body = response.json()
    assert body["path"] == "/v1/items"
    assert body["query"] == "id=3"


def test_header_route_sends_canaries_to_v2(client: httpx.Client) -> None:
    served_by = {
        client.get("/", headers={"x-canary": "true"}).headers["x-served-by"] for _ in range(20)
    }
    assert served_by == {"echo-v2"}


def test_weighted_split_sends_about_ten_percent_to_v2(client: httpx.Client) -> None:
    counts: collections.Counter[str] = collections.Counter()
    for _ in range(SPLIT_REQUESTS):
        response = client.get("/")
        assert response.status_code == 200
        counts[response.headers["x-served-by"]] += 1
    assert set(counts) <= {"echo-v1", "echo-v2"}
    # Binomial(400, 0.1): mean 40, standard deviation 6; 10..75 is beyond five
    # deviations either side, so a correct split fails here about never, while
    # 0 %, 50 % or an inverted 90 % split fail every time.
    assert 10 <= counts["echo-v2"] <= 75, counts


_PARENT = """
import signal, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-m", "gateway.quickstart", "examples/quickstart/"],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
)
print(child.pid, flush=True)
for line in child.stdout:
    if line.startswith("$ meshgate run "):
        print("ready", flush=True)
        break
signal.pause()  # until the test kills this process, as a signal ends make alone
"""


def test_quickstart_stops_with_its_backends_when_its_parent_dies() -> None:
    gateway_port, v1, v2, admin_port = _free_ports(4)
    env = dict(os.environ)
    env["MESHGATE_QUICKSTART_PORTS"] = f"8080={gateway_port},9081={v1},9082={v2}"
    env["MESHGATE_QUICKSTART_ADMIN_PORT"] = str(admin_port)
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        quickstart_pid = int(parent.stdout.readline())
        assert parent.stdout.readline().strip() == "ready"
        with httpx.Client(base_url=f"http://127.0.0.1:{gateway_port}") as client:
            deadline = time.monotonic() + START_TIMEOUT_S
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        break
                time.sleep(0.05)  # polling a port: there is nothing to block on
        tree = _process_tree(quickstart_pid)
        assert len(tree) >= 4, "expected the quickstart, two demo backends and the gateway"
    finally:
        parent.kill()
        parent.wait(10)
    deadline = time.monotonic() + 20.0
    while any(map(_alive, tree)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel reaps asynchronously; bounded poll
    left = [pid for pid in tree if _alive(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, "processes outlived the quickstart's parent"


def test_sigterm_stops_the_gateway_and_the_backends(
    quickstart: Quickstart, client: httpx.Client
) -> None:
    # The module's last test: it stops the shared quickstart process.
    quickstart.wait_for_line(r"\$ meshgate run ")
    descendants = _process_tree(quickstart.process.pid)[1:]
    assert len(descendants) >= 3, "expected two demo backends and the gateway"
    assert quickstart.stop() == 0
    deadline = time.monotonic() + 5.0
    while any(map(_alive, descendants)) and time.monotonic() < deadline:
        time.sleep(0.05)  # the kernel reaps asynchronously; bounded poll
    assert not [pid for pid in descendants if _alive(pid)]
