"""TLS listeners follow a reload, as Envoy's listeners and secrets do under Istio: a
reload that adds an HTTPS port binds it (TCP and HTTP/3), one that changes a
server's credentials serves the new certificate to new connections, and one that
removes the port closes it, all without a restart."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from test_gateway_helpers import Backend, Gateway, free_ports
from tls_certs import CA

from gateway.server.h3client import client_configuration, connect_h3

BASE = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.reload.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [a.example.com]
  gateways: [edge]
  http:
    - route: [{{destination: {{host: web.reload.test}}}}]
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {http}, name: http, protocol: HTTP}}
      hosts: [a.example.com]
"""

HTTPS_SERVER = """\
    - port: {{number: {https}, name: https, protocol: HTTPS}}
      hosts: [a.example.com]
      tls: {{mode: SIMPLE, credentialName: {credential}}}
"""


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.ca = CA(tmp / "pki")
        creds = tmp / "credentials"
        self.serials = {
            name: self.ca.issue(
                name,
                dns=("a.example.com",),
                folder=creds / name,
                cert_name="tls.crt",
                key_name="tls.key",
            ).serial
            for name in ("cert-one", "cert-two")
        }
        self.http, self.https, backend, admin = free_ports(4)
        self.backend = Backend(backend, "web")
        self.config = tmp / "config"
        self.config.mkdir()
        self.reloads = 0
        self.write(None)
        self.gateway = Gateway(
            self.config,
            admin,
            "--credentials-dir",
            str(creds),
            "--cert-poll-s",
            "0.1",
            "--reload-interval-s",
            "0.05",
        )

    def write(self, credential: str | None) -> None:
        text = BASE.format(backend=self.backend.port, http=self.http)
        if credential is not None:
            text += HTTPS_SERVER.format(https=self.https, credential=credential)
        scratch = self.config / ".gateway.yaml.tmp"
        scratch.write_text(text)
        os.replace(scratch, self.config / "gateway.yaml")

    def reload(self, credential: str | None) -> None:
        """Write the configuration and wait until the gateway has applied it."""
        self.write(credential)
        self.reloads += 1
        number = f"reload #{self.reloads} "
        self.gateway.wait_stderr(lambda line: number in line and " applied " in line)

    def problems(self) -> list[str]:
        return [line for line in self.gateway.stderr if "problem:" in line]

    def get(self) -> httpx.Response:
        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        with httpx.Client(transport=httpx.HTTPTransport(verify=ctx), timeout=10) as client:
            return client.get(
                f"https://127.0.0.1:{self.https}/",
                headers={"host": "a.example.com"},
                extensions={"sni_hostname": "a.example.com"},
            )

    def serial(self) -> int:
        from cryptography import x509

        ctx = ssl.create_default_context(cafile=str(self.ca.path))
        with (
            socket.create_connection(("127.0.0.1", self.https), timeout=5) as raw,
            ctx.wrap_socket(raw, server_hostname="a.example.com") as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        return x509.load_der_x509_certificate(der).serial_number

    def h3_status(self) -> int:
        async def scenario() -> int:
            config = client_configuration("a.example.com", cadata=self.ca.path.read_bytes())
            async with asyncio.timeout(10):
                async with connect_h3("127.0.0.1", self.https, config) as client:
                    response = await client.request("GET", "a.example.com", "/", [], b"")
            return response.status

        return asyncio.run(scenario())

    def stop(self) -> None:
        try:
            self.gateway.stop()
        finally:
            self.backend.stop()


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    started = Stack(tmp_path)
    try:
        yield started
    finally:
        started.stop()


def test_https_port_added_changed_and_removed_by_reloads(stack: Stack) -> None:
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.https), timeout=2).close()

    stack.reload("cert-one")
    response = stack.get()
    assert response.status_code == 200
    assert response.headers.get("alt-svc", "").startswith(f'h3=":{stack.https}"')
    assert stack.serial() == stack.serials["cert-one"]
    assert stack.h3_status() == 200

    stack.reload("cert-two")
    assert stack.serial() == stack.serials["cert-two"]
    assert stack.get().status_code == 200
    assert stack.h3_status() == 200

    stack.reload(None)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.https), timeout=2).close()
    assert stack.problems() == []


def test_a_reload_naming_missing_credentials_binds_the_port_and_reports_it(
    stack: Stack,
) -> None:
    stack.reload("cert-three")  # no such folder in the credentials directory
    problem = stack.gateway.wait_stderr(lambda line: "problem:" in line)
    assert "cert-three" in problem and str(stack.https) in problem
    # Bound, as at start-up with missing credentials: handshakes are refused until
    # the files appear (the certificate watcher then loads them).
    socket.create_connection(("127.0.0.1", stack.https), timeout=5).close()
    with pytest.raises((ssl.SSLError, ConnectionResetError)):
        stack.serial()
