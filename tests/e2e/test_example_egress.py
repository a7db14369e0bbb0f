"""``examples/egress`` end to end: the example's three ways out, as written.

Only the gateway's listener ports are changed (to free ones). The example's names
are answered by a DNS server on 127.0.0.1 (``--dns-server``) and point at an HTTPS
server on port 443 of a random loopback address, with a certificate from a test CA,
so nothing leaves loopback. That CA is not in the system trust store the example's
TLS origination verifies against, which is what the first test shows.
"""

from __future__ import annotations

import random
import shutil
import socket
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from dns_server import DnsServer
from test_gateway_helpers import MESHGATE, Gateway, free_ports
from traffic_backends import ScriptedBackend, TestCA

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "egress"


class Setup:
    def __init__(self, tmp: Path) -> None:
        ca = TestCA(tmp / "pki")
        self.ca = ca.ca_path
        names = ["api.example.com", "www.cdn.example.com"]
        context = ca.server_context("external", names, require_client=False)
        # The example dials port 443 as written; an address of loopback's /8 picked
        # at random keeps two test runs on one machine from wanting the same socket.
        rnd = random.Random()
        self.address = f"127.{rnd.randint(1, 254)}.{rnd.randint(0, 255)}.{rnd.randint(2, 254)}"
        try:
            self.backend = ScriptedBackend(443, "external", context, address=self.address)
        except OSError as exc:
            pytest.skip(f"the example's external service needs {self.address}:443: {exc}")
        self.dns = DnsServer()
        for name in names:
            self.dns.set(name, [self.address], ttl=60)
        self.port, self.tls_port, admin = free_ports(3)
        config = tmp / "egress"
        shutil.copytree(EXAMPLE, config)
        gateway = config / "gateway.yaml"
        gateway.write_text(
            gateway.read_text()
            .replace("number: 8080", f"number: {self.port}")
            .replace("number: 8443", f"number: {self.tls_port}")
        )
        self.gateway = Gateway(config, admin, "--dns-server", self.dns.address, command="egress")

    def curl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "10", "--cacert", str(self.ca), *args],
            capture_output=True,
            timeout=20,
        )

    def stop(self) -> None:
        self.gateway.stop()
        self.backend.stop()
        self.dns.stop()


@pytest.fixture(scope="module")
def eg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    setup = Setup(tmp_path_factory.mktemp("example-egress"))
    try:
        yield setup
    finally:
        setup.stop()


def test_example_validates() -> None:
    result = subprocess.run([MESHGATE, "validate", str(EXAMPLE)], capture_output=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert b"0 warnings" in result.stdout


def test_plain_http_is_originated_as_tls_and_an_untrusted_certificate_refused(
    eg: Setup,
) -> None:
    rid = uuid.uuid4().hex
    response = httpx.get(
        f"http://127.0.0.1:{eg.port}/",
        headers={"host": "api.example.com", "x-request-id": rid},
        timeout=10,
    )
    assert response.status_code == 503
    log = eg.gateway.log_for(rid)
    assert log["route"] == "VirtualService/egress/api-example-com"
    assert log["response_flags"] == "UF" and log["upstream_host"] == f"{eg.address}:443"
    eg.gateway.wait_stderr(
        lambda ln: "outbound|80||api.example.com" in ln and "CERTIFICATE_VERIFY_FAILED" in ln
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_https_proxy_clients_tunnel_to_registered_hosts(eg: Setup) -> None:
    proxy = f"http://127.0.0.1:{eg.port}"
    for url in ("https://api.example.com/connect", "https://www.cdn.example.com/connect"):
        result = eg.curl("--proxy", proxy, url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"external 200")
    refused = eg.curl("--proxy", proxy, "https://elsewhere.example.net/")
    assert refused.returncode != 0 and b"502" in refused.stderr


def test_tls_passthrough_follows_the_sni(eg: Setup) -> None:
    context = ssl.create_default_context(cafile=str(eg.ca))
    with (
        socket.create_connection(("127.0.0.1", eg.tls_port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="api.example.com") as tls,
    ):
        tls.sendall(b"GET /sni HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        assert tls.recv(4096).startswith(b"HTTP/1.1 200")


def test_unregistered_destination_is_refused(eg: Setup) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{eg.port}/", headers={"host": "elsewhere.example.net"}, timeout=10
    )
    assert response.status_code == 502
