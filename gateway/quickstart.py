"""``make run``: the gateway on a quickstart configuration, with its demo backends.

    python -m gateway.quickstart [CONFIG_DIR]      # default: examples/quickstart/

Reads the Istio YAML in CONFIG_DIR, starts one ``meshgate demo-backend`` for every
static loopback endpoint its ServiceEntries list (named ``<app>-<version>`` from the
endpoint's labels), prints curl commands that show the routes off, and then runs
``meshgate run CONFIG_DIR`` in the foreground. Ctrl-C or SIGTERM stops the gateway and
the backends; the children are also asked (``PR_SET_PDEATHSIG``) to stop if this
process dies without cleaning up, so no backend outlives it. This process asks the
same of its own parent: when ``make run`` is ended by a signal to ``make`` alone (a
supervisor's SIGTERM, ``timeout``), which does not pass it on, the quickstart stops
and takes its children with it.

Ports are those written in the YAML (gateway 8080, backends 9081/9082). To run beside
something that already holds them, remap any of them, and the admin port::

    MESHGATE_QUICKSTART_PORTS=8080=18080,9081=19081 MESHGATE_QUICKSTART_ADMIN_PORT=15100

With a remap, the YAML is copied to a temporary directory with the port numbers
replaced (Gateway server ports and ServiceEntry endpoint ports), and that copy is
what the gateway reads. This module only orchestrates processes: what the YAML
means is the gateway's business.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

__all__ = ["Backend", "find_backends", "main", "parse_port_map", "remap_ports"]

DEFAULT_CONFIG = "examples/quickstart/"
PORTS_ENV = "MESHGATE_QUICKSTART_PORTS"
ADMIN_PORT_ENV = "MESHGATE_QUICKSTART_ADMIN_PORT"
DEFAULT_ADMIN_PORT = 15000
BACKEND_START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class Backend:
    """A demo backend to start: its name (the ``x-served-by`` it answers with) and port."""

    name: str
    address: str
    port: int


class _Stop(Exception):
    """Raised from the signal handler to leave the foreground wait."""


def parse_port_map(text: str) -> dict[int, int]:
    """``"8080=18080,9081=19081"`` -> ``{8080: 18080, 9081: 19081}``; ValueError if bad."""
    mapping: dict[int, int] = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        old, sep, new = pair.partition("=")
        if not sep:
            raise ValueError(f"{PORTS_ENV}: {pair!r} is not of the form OLD=NEW")
        try:
            mapping[int(old)] = int(new)
        except ValueError:
            raise ValueError(f"{PORTS_ENV}: {pair!r}: ports must be numbers") from None
    return mapping


def _documents(config_dir: Path) -> Iterator[tuple[Path, list[Any]]]:
    for path in sorted(config_dir.iterdir()):
        if path.suffix in (".yaml", ".yml"):
            with path.open() as stream:
                yield path, [doc for doc in yaml.safe_load_all(stream) if doc is not None]


def _endpoint_port(endpoint: Mapping[str, Any], entry_ports: Sequence[Any]) -> int | None:
    """Istio: an endpoint's ``ports`` maps a service port name to the endpoint's port;
    with no mapping the endpoint listens on the service port itself."""
    mapped = endpoint.get("ports") or {}
    if mapped:
        return int(next(iter(mapped.values())))
    if entry_ports:
        return int(entry_ports[0].get("targetPort") or entry_ports[0]["number"])
    return None


def find_backends(config_dir: Path) -> list[Backend]:
    """Every static loopback endpoint of the ServiceEntries in ``config_dir``."""
    backends: list[Backend] = []
    for _, docs in _documents(config_dir):
        for doc in docs:
            if not isinstance(doc, dict) or doc.get("kind") != "ServiceEntry":
                continue
            spec = doc.get("spec") or {}
            if spec.get("resolution") != "STATIC":
                continue
            for index, endpoint in enumerate(spec.get("endpoints") or []):
                address = str(endpoint.get("address", ""))
                port = _endpoint_port(endpoint, spec.get("ports") or [])
                if address not in _LOOPBACK or port is None:
                    continue
                labels = endpoint.get("labels") or {}
                base = labels.get("app") or doc["metadata"]["name"]
                name = f"{base}-{labels['version']}" if "version" in labels else f"{base}-{index}"
                backends.append(Backend(name=name, address=address, port=port))
    return backends


def gateway_ports(config_dir: Path) -> list[int]:
    """The plain-HTTP ports the Gateways in ``config_dir`` listen on."""
    ports = []
    for _, docs in _documents(config_dir):
        for doc in docs:
            if isinstance(doc, dict) and doc.get("kind") == "Gateway":
                for server in (doc.get("spec") or {}).get("servers") or []:
                    port = server.get("port") or {}
                    if str(port.get("protocol", "")).upper() == "HTTP":
                        ports.append(int(port["number"]))
    return ports


def remap_ports(config_dir: Path, mapping: Mapping[int, int], out_dir: Path) -> None:
    """Copy the YAML files of ``config_dir`` to ``out_dir`` with listener and endpoint
    port numbers replaced per ``mapping``. Service ports (what clients of the mesh
    name) are left alone: only where something actually binds changes."""
    for path, docs in _documents(config_dir):
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            spec = doc.get("spec") or {}
            if doc.get("kind") == "Gateway":
                for server in spec.get("servers") or []:
                    port = server.get("port") or {}
                    if port.get("number") in mapping:
                        port["number"] = mapping[port["number"]]
            elif doc.get("kind") == "ServiceEntry":
                for endpoint in spec.get("endpoints") or []:
                    ports = endpoint.get("ports") or {}
                    for key, value in ports.items():
                        if value in mapping:
                            ports[key] = mapping[value]
        with (out_dir / path.name).open("w") as stream:
            yaml.safe_dump_all(docs, stream, sort_keys=False)


def _die_with_parent() -> None:
    """SIGTERM the calling process when its parent dies (in each child between fork
    and exec, and in the quickstart itself)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    # preexec_fn is unsafe only with threads, and this process starts none.
    return subprocess.Popen(argv, preexec_fn=preexec)


def _wait_listening(backend: Backend, process: subprocess.Popen[bytes]) -> None:
    """Wait (bounded) until the backend accepts connections or exits."""
    deadline = time.monotonic() + BACKEND_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"demo backend {backend.name} exited with {process.returncode}")
        try:
            socket.create_connection((backend.address, backend.port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a port: there is nothing to block on
    raise RuntimeError(f"demo backend {backend.name} did not listen on port {backend.port}")


def _stop(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every live child, then wait for each with a bound; SIGKILL stragglers."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT_S)


def _print_tryouts(gateway_port: int, backends: Sequence[Backend]) -> None:
    base = f"http://127.0.0.1:{gateway_port}"
    names = ", ".join(f"{b.name} on {b.address}:{b.port}" for b in backends)
    lines = [
        "",
        f"meshgate quickstart: demo backends {names}; gateway on {base}",
        "Try, in another terminal:",
        "",
        "  # prefix route: /api/ goes to v1, rewritten to /v1/",
        f"  curl -si {base}/api/items",
        "",
        "  # header route: x-canary: true goes to v2",
        f"  curl -si -H 'x-canary: true' {base}/",
        "",
        "  # weighted split: about 18 of 20 requests to v1, 2 to v2",
        f"  for i in $(seq 20); do curl -si {base}/ | grep -i '^x-served-by'; done"
        " | sort | uniq -c",
        "",
        "Ctrl-C stops the gateway and the backends.",
        "",
    ]
    print("\n".join(lines), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or (args and args[0] in ("-h", "--help")):
        print(__doc__)
        return 0 if args and args[0] in ("-h", "--help") else 2
    config_dir = Path(args[0] if args else DEFAULT_CONFIG)
    if not config_dir.is_dir():
        print(f"quickstart: {config_dir} is not a directory of YAML files", file=sys.stderr)
        return 2
    try:
        mapping = parse_port_map(os.environ.get(PORTS_ENV, ""))
        admin_port = int(os.environ.get(ADMIN_PORT_ENV, DEFAULT_ADMIN_PORT))
    except ValueError as exc:
        print(f"quickstart: {exc}", file=sys.stderr)
        return 2

    scratch: str | None = None
    if mapping:
        scratch = tempfile.mkdtemp(prefix="meshgate-quickstart-")
        remap_ports(config_dir, mapping, Path(scratch))
        config_dir = Path(scratch)

    children: list[subprocess.Popen[bytes]] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise _Stop(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if sys.platform.startswith("linux"):
            parent = os.getppid()
            _die_with_parent()
            if os.getppid() != parent:
                raise _Stop(signal.SIGTERM)  # the parent died before we asked
        backends = find_backends(config_dir)
        for backend in backends:
            argv_backend = [sys.executable, "-m", "gateway.cli", "demo-backend"]
            argv_backend += ["--port", str(backend.port), "--name", backend.name]
            argv_backend += ["--address", backend.address]
            children.append(_spawn(argv_backend))
        for backend, process in zip(backends, children, strict=True):
            _wait_listening(backend, process)
        ports = gateway_ports(config_dir)
        _print_tryouts(ports[0] if ports else 8080, backends)
        gateway_argv = [sys.executable, "-m", "gateway.cli", "run", str(config_dir)]
        gateway_argv += ["--admin-port", str(admin_port)]
        print("$ meshgate " + shlex.join(gateway_argv[3:]), flush=True)
        gateway = _spawn(gateway_argv)
        children.append(gateway)
        return gateway.wait()
    except _Stop:
        return 0
    except RuntimeError as exc:
        print(f"quickstart: {exc}", file=sys.stderr)
        return 1
    finally:
        # Signals during cleanup must not cut it short and leave children behind.
        for signum in previous:
            signal.signal(signum, signal.SIG_IGN)
        _stop(children)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
