"""``gateway.server.quicports``: the UDP side of an HTTPS port is bound and advertised
at start, and becomes an HTTP/3 server with its first datagram. Real UDP sockets on
127.0.0.1, the real certificate store, aioquic's client."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from edge_config import compile_edge
from tls_certs import CA

from gateway.routing.table import Listener
from gateway.server import altsvc, http3
from gateway.server.events import DownstreamStream, ResponseHead
from gateway.server.h3client import client_configuration, connect_h3
from gateway.server.quicports import HTTP3Listeners
from gateway.server.settings import ServerSettings
from gateway.server.tls import CertificateStore


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _https_listener(tmp: Path, port: int, cert: Path, key: Path) -> Listener:
    server = (
        f"    - port: {{number: {port}, name: https, protocol: HTTPS}}\n"
        "      hosts: [localhost]\n"
        f"      tls: {{mode: SIMPLE, serverCertificate: {cert}, privateKey: {key}}}\n"
    )
    return compile_edge(tmp, server).listeners[port]


def _served_port(tmp_path: Path) -> tuple[CA, Any, int, Listener]:
    """A CA, a certificate for localhost, a free UDP port and the HTTPS listener that
    serves that certificate on it."""
    ca = CA(tmp_path / "pki")
    pair = ca.issue("server", dns=("localhost",))
    port = _free_udp_port()
    return ca, pair, port, _https_listener(tmp_path, port, pair.cert, pair.key)


async def answer(stream: DownstreamStream) -> None:
    await stream.send_head(ResponseHead(200, [("x-version", stream.head.http_version)]), False)
    await stream.send_body(b"hello over h3", True)


def test_port_is_advertised_at_once_and_serves_http3_from_its_first_datagram(
    tmp_path: Path,
) -> None:
    ca, _, port, listener = _served_port(tmp_path)

    async def main() -> None:
        store = CertificateStore([listener])
        quic = HTTP3Listeners(answer, ServerSettings(), "127.0.0.1")
        assert await quic.start([listener], store) == []
        quic_port = quic.listeners[port]
        # Bound and advertised; no QUIC server built yet (nothing has arrived).
        assert altsvc.ADVERTISED.get(port) == f'h3=":{port}"; ma=86400'
        assert quic_port.listener is None
        config = client_configuration("localhost", cadata=ca.path.read_bytes())
        async with asyncio.timeout(20), connect_h3("127.0.0.1", port, config) as client:
            first = await client.request("GET", "localhost", "/one")
            second = await client.request("GET", "localhost", "/two")
        assert (first.status, first.body, first.header("x-version")) == (
            200,
            b"hello over h3",
            "3",
        )
        assert second.status == 200
        assert isinstance(quic_port.listener, http3.QuicListener)
        assert quic_port.listener.port == port
        await quic.stop(drain_s=1.0)
        assert port not in altsvc.ADVERTISED

    asyncio.run(main())


# In a fresh interpreter: load the HTTP/3 stack as a waking port does, then make
# aioquic verify a certificate, which is the one thing its TLS module wants
# service_identity and pyOpenSSL for.
_LEAN_IMPORT_CHECK = """
import sys
from cryptography import x509
from gateway.server.quicports import import_aioquic_tls
import_aioquic_tls()
from gateway.server import http3  # noqa: F401
from aioquic import tls
verify_only = ("service_identity", "OpenSSL", "OpenSSL.crypto")
print(sorted(m for m in verify_only if m in sys.modules))
leaf = x509.load_pem_x509_certificate(open(sys.argv[1], "rb").read())
ca = open(sys.argv[2], "rb").read()
tls.verify_certificate(leaf, server_name="localhost", cadata=ca)
for server_name, cadata in (("elsewhere.example", ca), ("localhost", None)):
    try:
        tls.verify_certificate(leaf, server_name=server_name, cadata=cadata)
    except tls.AlertBadCertificate as exc:
        print("refused:", exc)
print(sorted(m for m in verify_only if m in sys.modules))
"""


def test_http3_stack_loads_without_the_packages_only_verification_needs(
    tmp_path: Path,
) -> None:
    ca = CA(tmp_path)
    leaf = ca.issue("leaf", dns=("localhost",))
    done = subprocess.run(
        [sys.executable, "-c", _LEAN_IMPORT_CHECK, str(leaf.cert), str(ca.path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # Not imported by loading the stack...
    assert lines[0] == "[]"
    # ...but the real ones answer when aioquic does verify: a wrong name (through
    # service_identity) and an unknown issuer (through pyOpenSSL's store) refused,
    # the right name under the right CA accepted.
    assert lines[1].startswith("refused:") and "elsewhere.example" in lines[1]
    assert lines[2].startswith("refused:") and "elsewhere.example" not in lines[2]
    assert lines[3] == "['OpenSSL', 'OpenSSL.crypto', 'service_identity']"


@pytest.mark.parametrize("failure", ["certificate", "start"])
def test_port_that_cannot_wake_withdraws_alt_svc_and_drops_quic(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    failure: str,
) -> None:
    """A certificate the TLS side took but QUIC cannot, or any other failure while
    the HTTP/3 side starts (both injected: no real certificate or set-up known to
    meshgate does that)."""
    _, _, port, listener = _served_port(tmp_path)

    def refuse(*_: object) -> object:
        raise ValueError("unsupported key")

    def broken(*_: object) -> object:
        raise RuntimeError("no QUIC today")

    if failure == "certificate":
        monkeypatch.setattr(http3, "quic_certificate_from_pem", refuse)
    else:
        monkeypatch.setattr(http3, "QuicListener", broken)

    async def main() -> None:
        store = CertificateStore([listener])
        quic = HTTP3Listeners(answer, ServerSettings(), "127.0.0.1")
        await quic.start([listener], store)
        quic_port = quic.listeners[port]
        assert port in altsvc.ADVERTISED
        # One datagram (what it holds does not matter: the port wakes before reading).
        woke = asyncio.get_running_loop().create_future()
        wake = quic_port._wake

        def observed(target: Any) -> None:
            try:
                wake(target)
            finally:
                woke.set_result(None)

        quic_port._wake = observed
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"\xc0not quic", ("127.0.0.1", port))
            async with asyncio.timeout(10):
                await woke
        assert quic_port.broken and quic_port.listener is None
        assert port not in altsvc.ADVERTISED  # clients stop being sent to HTTP/3
        await quic.stop(drain_s=1.0)

    with caplog.at_level(logging.ERROR, logger="meshgate.http3"):
        asyncio.run(main())
    if failure == "certificate":
        assert f"HTTP/3 on port {port}: cannot load certificate: unsupported key" in caplog.text
        assert "HTTP/3 is not served there" in caplog.text
    else:
        assert f"HTTP/3 on port {port}: cannot start; not served there" in caplog.text
        assert "no QUIC today" in caplog.text


async def _served_serial(port: int, ca: CA) -> int:
    """The serial number of the certificate a new QUIC connection is shown."""
    config = client_configuration("localhost", cadata=ca.path.read_bytes())
    async with asyncio.timeout(20), connect_h3("127.0.0.1", port, config) as client:
        assert (await client.request("GET", "localhost", "/")).status == 200
        return int(client._quic.tls._peer_certificate.serial_number)


def _rotate(ca: CA, stem: str, cert: Path, key: Path) -> int:
    """Issue a new certificate and move it over the served files (new inodes, as a
    deploy tool or a Kubernetes secret update replaces them); its serial."""
    pair = ca.issue(stem, dns=("localhost",))
    os.replace(pair.key, key)
    os.replace(pair.cert, cert)
    return pair.serial


def test_rotated_certificates_reach_new_quic_connections_asleep_or_awake(
    tmp_path: Path,
) -> None:
    ca, served, port, listener = _served_port(tmp_path)

    async def main() -> None:
        store = CertificateStore([listener])
        quic = HTTP3Listeners(answer, ServerSettings(), "127.0.0.1")
        await quic.start([listener], store)
        # Rotated before any QUIC datagram: nothing to hand over; the port reads the
        # store's certificates when it wakes.
        second = _rotate(ca, "second", served.cert, served.key)
        assert store.refresh() == 1
        assert quic.refresh() == 0
        assert await _served_serial(port, ca) == second
        # Rotated while awake: the next refresh hands it to the live QUIC server; a
        # connection opened before keeps working.
        config = client_configuration("localhost", cadata=ca.path.read_bytes())
        async with asyncio.timeout(20), connect_h3("127.0.0.1", port, config) as kept:
            third = _rotate(ca, "third", served.cert, served.key)
            assert store.refresh() == 1
            assert quic.refresh() == 1
            assert await _served_serial(port, ca) == third
            assert (await kept.request("GET", "localhost", "/still")).status == 200
            assert int(kept._quic.tls._peer_certificate.serial_number) == second
        await quic.stop(drain_s=1.0)

    asyncio.run(main())
