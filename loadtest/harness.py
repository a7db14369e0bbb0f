"""What the benchmark (``bench.py``) and the load test (``run_loadtest.py``) share:
starting and stopping processes by PID, free ports, bounded readiness waits, CPU
and memory of a process tree from /proc, a throw-away TLS certificate, JWT signing
keys, a redis-server, and the facts about the machine a report starts with.

Everything listens on 127.0.0.1. Every wait is bounded; every process started
through ``Processes`` is stopped by its own PID (its whole tree, if it ignores
SIGTERM).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import platform
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
START_TIMEOUT_S = 60.0
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- /proc


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(text[text.rindex(")") + 2 :].split()[1])
        children.setdefault(parent, []).append(int(entry))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant (a gateway's workers, nginx's workers)."""
    children = _children()
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, ()))
    return tree


def cpu_ticks(pid: int) -> int:
    """utime + stime of all the process's threads, in clock ticks; 0 once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_mb(root: int) -> tuple[float, int]:
    """Resident memory of the whole tree in MB, and how many processes it has."""
    tree = process_tree(root)
    return sum(rss_kb(pid) for pid in tree) / 1024.0, len(tree)


# --------------------------------------------------------------------------- processes


class Processes:
    """Everything one run started, each stopped by its own PID."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.started: dict[str, subprocess.Popen[bytes]] = {}
        self.log = (scratch / "servers.log").open("ab")

    def start(
        self,
        name: str,
        argv: list[str],
        core: str | None = None,
        *,
        stdout: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` (pinned to ``core`` with taskset when given)."""
        if core is not None:
            argv = ["taskset", "-c", core, *argv]
        # A session of its own, so a Ctrl-C in the terminal reaches only the driver,
        # which then stops everything in order (rather than racing the children).
        process = subprocess.Popen(
            argv,
            stdout=self.log if stdout is None else stdout,
            stderr=self.log,
            cwd=ROOT,
            start_new_session=True,
            env=env,
        )
        self.started[name] = process
        return process

    def pid(self, name: str) -> int:
        return self.started[name].pid

    def stop(self, name: str) -> None:
        process = self.started.pop(name, None)
        if process is None:
            return
        tree = process_tree(process.pid) if process.poll() is None else []
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {process.pid}) ignored SIGTERM for 10 s; killing it")
        for pid in reversed(tree):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            log(f"{name} (pid {process.pid}) still running after SIGKILL")

    def stop_all(self) -> None:
        for name in list(self.started):
            self.stop(name)
        if not self.log.closed:
            self.log.close()

    def tail_log(self, lines: int = 30) -> str:
        self.log.flush()
        text = (self.scratch / "servers.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_tcp_udp_port() -> int:
    """A port free for both TCP and UDP (HTTP/3 shares the HTTPS port number)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no port free for both TCP and UDP")


def _insecure_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def wait_http_ok(
    port: int,
    process: subprocess.Popen[bytes],
    name: str,
    *,
    path: str = "/",
    host: str = "bench",
    tls: bool = False,
    timeout_s: float = START_TIMEOUT_S,
) -> None:
    """Bounded wait until GET ``path`` on ``port`` answers 200 (the route works)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    context = _insecure_context() if tls else None
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} while starting")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
                sock: Any = raw
                if context is not None:
                    sock = context.wrap_socket(raw, server_hostname="localhost")
                sock.sendall(request)
                reply = sock.recv(65536)
            status = reply.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            if re.match(r"HTTP/1\.[01] 200 ", status):
                return
            last = status or "empty reply"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)  # polling a port: there is nothing to block on
    raise RuntimeError(f"{name} on port {port} did not answer 200 in time (last: {last})")


def start_redis(procs: Processes, core: str | None = None) -> str:
    """A redis-server on a free port, no persistence; returns its URL."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no"]
    process = procs.start("redis", argv, core)
    deadline = time.monotonic() + 10
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server did not answer PING within 10 s")
        time.sleep(0.05)  # polling a port: there is nothing to block on


# --------------------------------------------------------------------------- keys


def mint_certificate(directory: Path) -> None:
    """A self-signed ECDSA certificate for localhost and 127.0.0.1 in ``directory``:
    ``tls.crt`` (also the CA a verifying client trusts) and ``tls.key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    (directory / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def signing_key(directory: Path, name: str, alg: str, kid: str) -> str:
    """Write ``name``.pem (an RS256 or ES256 private key) and return the public JWKS
    document (JSON text) that verifies it."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    private: Any
    if alg == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(ECAlgorithm.to_jwk(private.public_key()))
    else:
        raise ValueError(f"unsupported algorithm {alg}")
    (directory / f"{name}.pem").write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return json.dumps({"keys": [{**jwk, "kid": kid, "alg": alg, "use": "sig"}]})


def render(template: Path, values: dict[str, str]) -> str:
    """``template``'s text with every ``@KEY@`` replaced; an unknown one is an error."""
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    left = re.findall(r"@[A-Z][A-Z0-9_]*@", text)
    if left:
        raise ValueError(f"{template.name}: no value for {', '.join(sorted(set(left)))}")
    return text


# --------------------------------------------------------------------------- facts


def _version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    match = re.search(pattern, done.stdout + done.stderr)
    return match.group(1) if match else "unknown"


def load_average() -> str:
    """The 1-minute load average: anything well above 0 means neighbours shared the cores."""
    return Path("/proc/loadavg").read_text().split()[0]


def machine_facts() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    try:
        import uvloop

        uvloop_version = uvloop.__version__
    except ImportError:
        uvloop_version = "not installed"
    try:
        import aioquic

        aioquic_version = aioquic.__version__
    except ImportError:
        aioquic_version = "not installed"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop_version,
        "aioquic": aioquic_version,
        "nginx": _version(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _version(["wrk", "-v"], r"wrk (\S+)"),
        "h2load": _version(["h2load", "--version"], r"nghttp2/(\S+)"),
        "commit": _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], r"(\w+)"),
    }
