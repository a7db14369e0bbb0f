"""A real ``redis-server`` for the rate-limit tests: started on a free port, stopped by PID.

``make test`` installs redis-server when it is missing; run without it, the tests
that need it are skipped with a printed reason.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the test process dies, so that an
    interrupted run (a timeout, Ctrl-C) leaves no redis-server behind."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class RedisServer:
    """One redis-server process; ``kill`` and ``start`` again keep the port."""

    def __init__(self, port: int | None = None, *extra: str) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.port = port or free_port()
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout_s
        while not _ping(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer on {self.port}")
            time.sleep(0.01)  # polling a port: there is nothing to block on

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Stop the server by its PID (SIGKILL by default: a crash, no goodbye)."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        proc.wait(10)

    def command(self, *args: str) -> bytes:
        """One command over a raw socket (RESP), for setting up state in tests."""
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"".join(parts))
            return s.recv(65536)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        print("redis-server not found: `make test` installs it")
        pytest.skip("redis-server is not installed (make test installs it)")
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.kill(signal.SIGTERM)
