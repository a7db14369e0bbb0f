"""TLS through a real ``meshgate run``: HTTPS with ALPN (httpx, curl), mutual TLS with
``credentialName`` from ``--credentials-dir``, certificate rotation on disk,
``httpsRedirect`` and PASSTHROUGH to a backend that terminates TLS itself.

One gateway process serves every case (several servers on one port, chosen by SNI),
so the module starts meshgate once."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway_helpers import Backend, Gateway, free_ports
from tls_certs import CA, Pair

SPIFFE = "spiffe://cluster.local/ns/shop/sa/buyer"

CONFIG = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - port: {{number: {https}, name: https-www, protocol: HTTPS}}
      hosts: [www.example.com]
      tls: {{mode: SIMPLE, credentialName: www-cert}}
    - port: {{number: {https}, name: https-api, protocol: HTTPS}}
      hosts: [api.example.com]
      tls: {{mode: MUTUAL, credentialName: api-cert}}
    - port: {{number: {http}, name: http, protocol: HTTP}}
      hosts: [www.example.com]
      tls: {{httpsRedirect: true}}
    - port: {{number: {passthrough}, name: tls-db, protocol: TLS}}
      hosts: [db.example.com]
      tls: {{mode: PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: web, namespace: default}}
spec:
  hosts: [web.tls.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.tls.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {tls_backend}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: web, namespace: default}}
spec:
  hosts: [www.example.com, api.example.com]
  gateways: [edge]
  http:
    - route: [{{destination: {{host: web.tls.test}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.example.com]
  gateways: [edge]
  tls:
    - match: [{{sniHosts: [db.example.com]}}]
      route: [{{destination: {{host: db.tls.test, port: {{number: 443}}}}}}]
"""


class TLSBackend:
    """A backend that terminates TLS itself and says what it saw (SNI, bytes)."""

    def __init__(self, pair: Pair) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(pair.cert), str(pair.key))
        self.seen_sni: list[str | None] = []
        self.ctx.sni_callback = lambda obj, name, ctx: self.seen_sni.append(name)  # type: ignore[assignment,misc,func-returns-value]
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while self.running:
            try:
                raw, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.ctx.wrap_socket(raw, server_side=True) as conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                body = b"tls-backend:" + data.split(b"\r\n", 1)[0]
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
                    % (len(body), body)
                )
        except (OSError, ssl.SSLError):
            return

    def stop(self) -> None:
        self.running = False
        self.sock.close()
        self.thread.join(5)


class Setup:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = CA(tmp / "pki")
        self.creds = tmp / "credentials"
        self.www = self.ca.issue(
            "www",
            dns=("www.example.com",),
            folder=self.creds / "www-cert",
            cert_name="tls.crt",
            key_name="tls.key",
        )
        self.ca.issue(
            "api",
            dns=("api.example.com",),
            folder=self.creds / "api-cert",
            cert_name="tls.crt",
            key_name="tls.key",
        )
        shutil.copy(self.ca.path, self.creds / "api-cert" / "ca.crt")
        self.client = self.ca.issue("client", uris=(SPIFFE,), common_name="buyer", client=True)
        self.db = self.ca.issue("db", dns=("db.example.com",))
        self.https, self.http, self.passthrough, backend, admin = free_ports(5)
        self.backend = Backend(backend, "web")
        self.tls_backend = TLSBackend(self.db)
        config = tmp / "config"
        config.mkdir()
        (config / "gateway.yaml").write_text(
            CONFIG.format(
                https=self.https,
                http=self.http,
                passthrough=self.passthrough,
                backend=backend,
                tls_backend=self.tls_backend.port,
            )
        )
        self.gateway = Gateway(
            config, admin, "--credentials-dir", str(self.creds), "--cert-poll-s", "0.1"
        )

    def stop(self) -> None:
        try:
            self.gateway.stop()
        finally:
            self.backend.stop()
            self.tls_backend.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    started = Setup(tmp_path_factory.mktemp("tls"))
    yield started
    started.stop()


def _client(setup: Setup, *, http2: bool, cert: Pair | None = None) -> httpx.Client:
    ctx = ssl.create_default_context(cafile=str(setup.ca.path))
    if cert is not None:
        ctx.load_cert_chain(str(cert.cert), str(cert.key))
    return httpx.Client(transport=httpx.HTTPTransport(http2=http2, verify=ctx), timeout=10)


def _get(client: httpx.Client, port: int, host: str, path: str = "/") -> httpx.Response:
    # Connect to 127.0.0.1 while the SNI and the Host say ``host``.
    return client.get(
        f"https://127.0.0.1:{port}{path}",
        headers={"host": host},
        extensions={"sni_hostname": host},
    )


def _serial(port: int, host: str, ca: Path) -> int:
    from cryptography import x509

    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_https_answers_http2_by_alpn_and_http11_otherwise(setup: Setup) -> None:
    with _client(setup, http2=True) as client:
        response = _get(client, setup.https, "www.example.com", "/h2")
    assert response.status_code == 200
    assert response.http_version == "HTTP/2"
    assert response.json()["path"] == "/h2"
    with _client(setup, http2=False) as client:
        response = _get(client, setup.https, "www.example.com", "/h1")
    assert response.status_code == 200
    assert response.http_version == "HTTP/1.1"
    # The forwarded request says it came in over https.
    assert response.json()["headers"]["x-forwarded-proto"] == "https"


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_verifies_the_gateway_certificate_and_speaks_http2(setup: Setup) -> None:
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(setup.ca.path),
            "--resolve",
            f"www.example.com:{setup.https}:127.0.0.1",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            f"https://www.example.com:{setup.https}/curl",
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.stdout == "200 2", result.stderr


def test_unknown_sni_gets_no_handshake(setup: Setup) -> None:
    ctx = ssl.create_default_context(cafile=str(setup.ca.path))
    with (
        socket.create_connection(("127.0.0.1", setup.https), timeout=5) as raw,
        pytest.raises((ssl.SSLError, ConnectionError)),
    ):
        ctx.wrap_socket(raw, server_hostname="unknown.example.com")


def test_mutual_tls_refuses_a_client_without_certificate(setup: Setup) -> None:
    with _client(setup, http2=False) as client, pytest.raises(httpx.TransportError):
        _get(client, setup.https, "api.example.com").read()


def test_mutual_tls_forwards_the_client_identity_upstream(setup: Setup) -> None:
    with _client(setup, http2=True, cert=setup.client) as client:
        response = _get(client, setup.https, "api.example.com", "/whoami")
    assert response.status_code == 200
    xfcc = response.json()["headers"]["x-forwarded-client-cert"]
    assert f"URI={SPIFFE}" in xfcc
    assert 'Subject="CN=buyer,O=meshgate tests"' in xfcc


def test_https_redirect_answers_301_on_the_plain_port(setup: Setup) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{setup.http}/cart?x=1", headers={"host": "www.example.com"}
    )
    assert response.status_code == 301
    assert response.headers["location"] == "https://www.example.com/cart?x=1"


def test_passthrough_reaches_a_backend_that_terminates_tls_itself(setup: Setup) -> None:
    ctx = ssl.create_default_context(cafile=str(setup.ca.path))
    with (
        socket.create_connection(("127.0.0.1", setup.passthrough), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="db.example.com") as tls,
    ):
        # The certificate is the backend's own: the gateway did not terminate.
        der = tls.getpeercert(binary_form=True)
        tls.sendall(b"GET /secret HTTP/1.1\r\nhost: db.example.com\r\n\r\n")
        data = b""
        while True:
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    from cryptography import x509

    assert der is not None
    assert x509.load_der_x509_certificate(der).serial_number == setup.db.serial
    assert data.endswith(b"tls-backend:GET /secret HTTP/1.1")
    assert "db.example.com" in setup.tls_backend.seen_sni
    # No access-log line: the gateway never parsed the HTTP request inside.
    assert not any("/secret" in line for line in setup.gateway.lines)


def test_rotated_certificate_reaches_new_connections_and_keeps_open_ones(setup: Setup) -> None:
    with _client(setup, http2=False) as open_client:
        assert _get(open_client, setup.https, "www.example.com", "/before").status_code == 200
        before = _serial(setup.https, "www.example.com", setup.ca.path)
        assert before == setup.www.serial
        rotated = setup.ca.issue(
            "www2",
            dns=("www.example.com",),
            folder=setup.creds / "www-cert",
            cert_name="tls.crt",
            key_name="tls.key",
        )
        deadline = time.monotonic() + 10
        serial = before
        while serial != rotated.serial and time.monotonic() < deadline:
            serial = _serial(setup.https, "www.example.com", setup.ca.path)
        assert serial == rotated.serial
        # The keep-alive connection made before the rotation is still in use.
        response = _get(open_client, setup.https, "www.example.com", "/after")
        assert response.status_code == 200
        assert _peer_serial(response) == before


def _peer_serial(response: httpx.Response) -> int:
    from cryptography import x509

    obj: Any = response.extensions["network_stream"].get_extra_info("ssl_object")
    return x509.load_der_x509_certificate(obj.getpeercert(True)).serial_number
