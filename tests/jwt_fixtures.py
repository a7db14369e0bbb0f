"""Test helpers for JWT work: keys and tokens minted with jwcrypto (not pyjwt, which
the gateway verifies with, so the two implementations check each other), and a real
JWKS server on 127.0.0.1 (HTTP or HTTPS with a CA minted here) that counts requests.
"""

from __future__ import annotations

import datetime
import json
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from jwcrypto import jwk, jws
from jwcrypto.common import base64url_encode, json_encode

ISSUER = "https://issuer.example.com"
AUDIENCE = "api.example.com"


def rsa_key(kid: str = "rsa-1") -> jwk.JWK:
    return jwk.JWK.generate(kty="RSA", size=2048, kid=kid)


def ec_key(kid: str = "ec-1", crv: str = "P-256") -> jwk.JWK:
    return jwk.JWK.generate(kty="EC", crv=crv, kid=kid)


def ed_key(kid: str = "ed-1") -> jwk.JWK:
    return jwk.JWK.generate(kty="OKP", crv="Ed25519", kid=kid)


def jwks_json(*keys: jwk.JWK) -> str:
    return json.dumps({"keys": [json.loads(k.export_public()) for k in keys]})


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "alice",
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 600,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def mint(key: jwk.JWK, payload: dict[str, Any], alg: str = "RS256", **header: Any) -> str:
    """A compact JWS signed by jwcrypto; ``header`` entries override (kid=None drops)."""
    protected: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": key.get("kid")}
    protected.update(header)
    protected = {k: v for k, v in protected.items() if v is not None}
    token = jws.JWS(json_encode(payload).encode())
    token.add_signature(key, alg=alg, protected=json_encode(protected))
    return token.serialize(compact=True)


def unsigned(payload: dict[str, Any]) -> str:
    """``alg: none``: a header, a payload and an empty signature."""
    head = base64url_encode(json_encode({"alg": "none", "typ": "JWT"}))
    return f"{head}.{base64url_encode(json_encode(payload))}."


def hs256_with_public_key(key: jwk.JWK, payload: dict[str, Any]) -> str:
    """The key-confusion attack: HS256 keyed with the RSA public key's PEM bytes."""
    pem = key.export_to_pem()  # public part
    secret = jwk.JWK(kty="oct", k=base64url_encode(pem))
    return mint(secret, payload, alg="HS256", kid=key.get("kid"))


# --------------------------------------------------------------------------- JWKS server


@dataclass
class JwksServer:
    """A JWKS endpoint on 127.0.0.1; ``document`` can be swapped, ``down`` fails it."""

    document: str
    down: bool = False
    requests: int = 0
    port: int = 0
    scheme: str = "http"
    ca_file: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Any = None
    _thread: Any = None
    fetched: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/jwks.json"

    def start(self, tls: ssl.SSLContext | None = None) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with owner._lock:
                    owner.requests += 1
                    down = owner.down
                    body = owner.document.encode()
                owner.fetched.set()
                if down:
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
            self.scheme = "https"
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def set(self, document: str | None = None, down: bool | None = None) -> None:
        with self._lock:
            if document is not None:
                self.document = document
            if down is not None:
                self.down = down

    def count(self) -> int:
        with self._lock:
            return self.requests

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def make_tls(directory: Path) -> tuple[ssl.SSLContext, str]:
    """A CA and a server certificate for 127.0.0.1; returns (server context, CA path)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshgate test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    import ipaddress

    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = directory / "ca.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_path, key_path)
    return context, str(ca_path)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer(document=jwks_json())
    server.start()
    yield server
    server.stop()
