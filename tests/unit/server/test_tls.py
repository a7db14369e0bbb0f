"""TLS termination in process: real sockets on 127.0.0.1, real handshakes with
Python's ssl and httpx, the listener set on uvloop in a thread, a handler that
answers with what the request looked like to the pipeline."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvloop
from edge_config import edge_yaml
from tls_certs import CA

from gateway.config.load import load_config
from gateway.routing.compile import compile_snapshot
from gateway.routing.table import Snapshot
from gateway.server.events import DownstreamStream, ResponseHead
from gateway.server.listeners import ListenerSet, partition_listeners
from gateway.server.settings import ServerSettings
from gateway.server.tls import (
    CertificateStore,
    NotTLS,
    parse_client_hello,
    select_by_sni,
    xfcc_value,
)

# --------------------------------------------------------------------------- helpers


def _client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real ssl client, taken from a memory BIO."""
    ctx = ssl.create_default_context()
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    if server_name is None:
        ctx.check_hostname = False
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def _answer(stream: DownstreamStream) -> dict[str, Any]:
    head = stream.head
    identity = head.peer_identity
    return {
        "scheme": head.scheme,
        "version": head.http_version,
        "authority": head.authority,
        "xfcc": head.header("x-forwarded-client-cert"),
        "identity": None
        if identity is None
        else {"subject": identity.subject, "uris": list(identity.uris), "dns": list(identity.dns)},
    }


async def _handler(stream: DownstreamStream) -> None:
    while await stream.read_body():
        pass
    body = json.dumps(_answer(stream)).encode()
    await stream.send_head(
        ResponseHead(
            200, [("content-type", "application/json"), ("content-length", str(len(body)))]
        ),
        end_stream=False,
    )
    await stream.send_body(body, end_stream=True)


class Served:
    """A ListenerSet for a compiled Snapshot, on uvloop in a thread of its own."""

    def __init__(self, snapshot: Snapshot, credentials_dir: Path | None, poll_s: float) -> None:
        self.snapshot = snapshot
        self.loop = uvloop.new_event_loop()
        self.ready = threading.Event()
        self.ports: list[int] = []
        self.store: CertificateStore | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(credentials_dir, poll_s), daemon=True
        )
        self.thread.start()
        if not self.ready.wait(10):
            raise TimeoutError("listener set did not start")
        if self.error is not None:
            raise self.error

    def _run(self, credentials_dir: Path | None, poll_s: float) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start(credentials_dir, poll_s))
        self.ready.set()
        if self.error is None:
            self.loop.run_forever()
        self.loop.run_until_complete(self._stop())
        self.loop.close()

    async def _start(self, credentials_dir: Path | None, poll_s: float) -> None:
        try:
            served, _ = partition_listeners(self.snapshot.listeners.values())
            tls = [listener for listener in served if listener.tls_servers]

            class Ref:
                current = self.snapshot

            self.set = ListenerSet(_handler, ServerSettings(), "127.0.0.1")
            self.store = CertificateStore(tls, str(credentials_dir) if credentials_dir else None)
            self.set.certificates = self.store
            self.set.snapshot_ref = Ref()
            self.ports = await self.set.start_tls(tls)
            self.store.start(poll_s)
        except BaseException as exc:  # reported to the test thread
            self.error = exc

    async def _stop(self) -> None:
        await self.set.stop(1.0)
        if self.store is not None:
            await self.store.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _compile(tmp: Path, yaml_text: str) -> Snapshot:
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "gateway.yaml").write_text(yaml_text)
    model = load_config([str(tmp / "config")])
    return compile_snapshot(model, {"istio": "ingressgateway"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gateway_yaml(port: int, servers: str) -> str:
    return edge_yaml(servers.replace("PORT", str(port)))


def _server(name: str, hosts: str, tls: str) -> str:
    return (
        f"    - port: {{number: PORT, name: {name}, protocol: HTTPS}}\n"
        f"      hosts: {hosts}\n"
        f"      tls: {tls}\n"
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = CA(tmp_path / "pki")
    other_ca = CA(tmp_path / "other", name="stranger CA")
    return {
        "ca": ca,
        "a": ca.issue("a", dns=("a.example.com",)),
        "b": ca.issue("b", dns=("b.example.com",)),
        "wild": ca.issue("wild", dns=("*.example.com",)),
        "client": ca.issue(
            "client",
            common_name="client",
            uris=("spiffe://cluster.local/ns/shop/sa/buyer",),
            dns=("buyer.test",),
            client=True,
        ),
        "stranger": other_ca.issue("stranger", dns=("stranger.test",), client=True),
    }


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(servers: str, credentials_dir: Path | None = None, poll_s: float = 0) -> Served:
        port = _free_port()
        snapshot = _compile(tmp_path, _gateway_yaml(port, servers))
        served = Served(snapshot, credentials_dir, poll_s)
        started.append(served)
        return served

    yield start
    for served in started:
        served.stop()


def _handshake(
    port: int,
    server_name: str | None,
    ca: Path,
    *,
    cert: tuple[Path, Path] | None = None,
    alpn: list[str] | None = None,
    versions: tuple[ssl.TLSVersion, ssl.TLSVersion] | None = None,
    ciphers: str | None = None,
) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    if server_name is None:
        ctx.check_hostname = False
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if versions is not None:
        if versions[0] < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        ctx.minimum_version, ctx.maximum_version = versions
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=server_name)
    except BaseException:
        raw.close()
        raise


def _get(sock: ssl.SSLSocket, host: str = "x") -> tuple[int, dict[str, Any]]:
    sock.sendall(f"GET / HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
    data = b""
    deadline = time.monotonic() + 5
    while b"\r\n\r\n" not in data and time.monotonic() < deadline:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    while len(body) < length and time.monotonic() < deadline:
        body += sock.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body)


def _peer_cn(sock: ssl.SSLSocket) -> str:
    cert = sock.getpeercert()
    assert cert is not None
    return dict(item[0] for item in cert["subject"])["commonName"]


def _refused(call: Callable[[], Any]) -> bool:
    """True when the handshake (or the first read) fails: the server refused."""
    try:
        sock = call()
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return sock.recv(1) == b""
    except (ssl.SSLError, ConnectionError, OSError):
        return True
    finally:
        sock.close()


# --------------------------------------------------------------------------- ClientHello


def test_client_hello_parser_reads_sni_and_alpn_from_a_real_client() -> None:
    hello = parse_client_hello(_client_hello("Shop.Example.com", ["h2", "http/1.1"]))
    assert hello is not None
    assert hello.server_name == "shop.example.com"
    assert hello.alpn == ("h2", "http/1.1")


def test_client_hello_without_sni_has_no_server_name() -> None:
    hello = parse_client_hello(_client_hello(None))
    assert hello is not None and hello.server_name is None


def test_partial_client_hello_asks_for_more_and_split_records_are_joined() -> None:
    data = _client_hello("a.example.com")
    assert parse_client_hello(data[:3]) is None
    assert parse_client_hello(data[: len(data) // 2]) is None
    # The same handshake message in two records (as a large hello is sent).
    body = data[5:]
    cut = len(body) // 3
    two = (
        b"\x16\x03\x01"
        + cut.to_bytes(2, "big")
        + body[:cut]
        + b"\x16\x03\x01"
        + (len(body) - cut).to_bytes(2, "big")
        + body[cut:]
    )
    hello = parse_client_hello(two)
    assert hello is not None and hello.server_name == "a.example.com"


def test_plaintext_http_is_not_a_client_hello() -> None:
    with pytest.raises(NotTLS):
        parse_client_hello(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")


def test_sni_choice_prefers_exact_then_longest_wildcard_then_catch_all() -> None:
    items = [
        (("*",), "any"),
        (("*.example.com",), "wild"),
        (("a.b.example.com",), "exact"),
        (("*.b.example.com",), "deeper"),
    ]
    assert select_by_sni(items, "a.b.example.com") == "exact"
    assert select_by_sni(items, "c.b.example.com") == "deeper"
    assert select_by_sni(items, "c.example.com") == "wild"
    assert select_by_sni(items, "example.com") == "any"
    assert select_by_sni(items, None) == "any"
    assert select_by_sni(items[1:], "other.org") is None
    assert select_by_sni(items[1:], None) is None


# --------------------------------------------------------------------------- handshakes


def test_simple_tls_serves_https_and_refuses_an_untrusting_client(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a = pki["a"]
    served = serve(
        _server(
            "https",
            '["a.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {a.cert}, privateKey: {a.key}}}",
        )
    )
    port = served.ports[0]
    with _handshake(port, "a.example.com", pki["ca"].path) as sock:
        status, answer = _get(sock, "a.example.com")
    assert status == 200
    assert answer["scheme"] == "https" and answer["identity"] is None
    # A client with another trust root fails verification: nothing is served.
    other = pki["stranger"].cert.parent / "stranger-CA.crt"
    assert _refused(lambda: _handshake(port, "a.example.com", other))


def test_sni_picks_each_servers_certificate_and_unknown_sni_is_refused(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, b = pki["a"], pki["b"]
    served = serve(
        _server(
            "https-a",
            '["a.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {a.cert}, privateKey: {a.key}}}",
        )
        + _server(
            "https-b",
            '["b.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {b.cert}, privateKey: {b.key}}}",
        )
    )
    port = served.ports[0]
    for name in ("a.example.com", "b.example.com"):
        with _handshake(port, name, pki["ca"].path) as sock:
            assert _peer_cn(sock) == name
            assert _get(sock, name)[0] == 200
    # As Envoy with no matching filter chain: the connection is closed.
    assert _refused(lambda: _handshake(port, "c.example.com", pki["ca"].path))
    assert _refused(lambda: _handshake(port, None, pki["ca"].path))


def test_catch_all_server_takes_unknown_and_missing_sni(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, wild = pki["a"], pki["wild"]
    served = serve(
        _server(
            "https-a",
            '["a.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {a.cert}, privateKey: {a.key}}}",
        )
        + _server(
            "https-any",
            '["*"]',
            f"{{mode: SIMPLE, serverCertificate: {wild.cert}, privateKey: {wild.key}}}",
        )
    )
    port = served.ports[0]
    with _handshake(port, "a.example.com", pki["ca"].path) as sock:
        assert _peer_cn(sock) == "a.example.com"
    with _handshake(port, "zzz.example.com", pki["ca"].path) as sock:
        assert _peer_cn(sock) == "*.example.com"
    with _handshake(port, None, pki["ca"].path) as sock:
        assert _peer_cn(sock) == "*.example.com"


def test_mutual_tls_requires_a_client_certificate_and_exposes_its_identity(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, ca, client = pki["a"], pki["ca"], pki["client"]
    served = serve(
        _server(
            "mtls",
            '["a.example.com"]',
            f"{{mode: MUTUAL, serverCertificate: {a.cert}, privateKey: {a.key}, "
            f"caCertificates: {ca.path}}}",
        )
    )
    port = served.ports[0]
    assert _refused(lambda: _handshake(port, "a.example.com", ca.path))
    stranger = pki["stranger"]
    assert _refused(
        lambda: _handshake(port, "a.example.com", ca.path, cert=(stranger.cert, stranger.key))
    )
    with _handshake(port, "a.example.com", ca.path, cert=(client.cert, client.key)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-client-cert: forged\r\n\r\n")
        status, answer = _read_response(sock)
    assert status == 200
    identity = answer["identity"]
    assert identity["uris"] == ["spiffe://cluster.local/ns/shop/sa/buyer"]
    assert identity["dns"] == ["buyer.test"]
    assert identity["subject"] == "CN=client,O=meshgate tests"
    # The forged header is replaced by the gateway's own.
    assert "forged" not in answer["xfcc"]
    assert 'Subject="CN=client,O=meshgate tests"' in answer["xfcc"]
    assert "URI=spiffe://cluster.local/ns/shop/sa/buyer" in answer["xfcc"]


def _read_response(sock: ssl.SSLSocket) -> tuple[int, dict[str, Any]]:
    data = b""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        data += sock.recv(65536)
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = int(
                next(
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
            )
            if len(body) >= length:
                return int(head.split(b" ")[1]), json.loads(body[:length])
    raise TimeoutError("no response")


def test_client_san_allow_list_refuses_other_client_names(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, ca, client = pki["a"], pki["ca"], pki["client"]
    other = ca.issue("other-client", uris=("spiffe://cluster.local/ns/x/sa/y",), client=True)
    served = serve(
        _server(
            "mtls",
            '["a.example.com"]',
            f"{{mode: MUTUAL, serverCertificate: {a.cert}, privateKey: {a.key}, "
            f"caCertificates: {ca.path}, subjectAltNames: [spiffe://cluster.local/ns/shop/sa/buyer]}}",
        )
    )
    port = served.ports[0]
    with _handshake(port, "a.example.com", ca.path, cert=(client.cert, client.key)) as sock:
        assert _get(sock)[0] == 200
    assert _refused(
        lambda: _handshake(port, "a.example.com", ca.path, cert=(other.cert, other.key))
    )


def test_tls_1_1_is_refused_by_default_and_versions_are_honoured(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, ca = pki["a"], pki["ca"]
    pair = f"serverCertificate: {a.cert}, privateKey: {a.key}"
    served = serve(
        _server("default", '["a.example.com"]', f"{{mode: SIMPLE, {pair}}}")
        + _server(
            "only13", '["*.example.com"]', f"{{mode: SIMPLE, {pair}, minProtocolVersion: TLSV1_3}}"
        )
        + _server("only12", '["*"]', f"{{mode: SIMPLE, {pair}, maxProtocolVersion: TLSV1_2}}")
        + _server(
            "legacy", '["legacy.test"]', f"{{mode: SIMPLE, {pair}, minProtocolVersion: TLSV1_1}}"
        )
    )
    port = served.ports[0]
    v11 = (ssl.TLSVersion.TLSv1_1, ssl.TLSVersion.TLSv1_1)
    v12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    v13 = (ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_3)
    assert _refused(lambda: _handshake(port, "a.example.com", ca.path, versions=v11))
    # The same client is served where TLS 1.1 is allowed explicitly: the refusal
    # above is the default at work, not a client unable to speak TLS 1.1.
    with _version_only(port, "legacy.test", ca.path, v11) as sock:
        assert sock.version() == "TLSv1.1"
    for versions in (v12, v13):
        with _handshake(port, "a.example.com", ca.path, versions=versions) as sock:
            assert sock.version() == ("TLSv1.2" if versions is v12 else "TLSv1.3")
    # "only13" answers b.example.com and "only12" everything else, both with
    # a.example.com's certificate: these handshakes check versions, not names.
    assert _refused(lambda: _version_only(port, "b.example.com", ca.path, v12))
    with _version_only(port, "b.example.com", ca.path, v13) as sock:
        assert sock.version() == "TLSv1.3"
    assert _refused(lambda: _version_only(port, "c.other.org", ca.path, v13))
    with _version_only(port, "c.other.org", ca.path, v12) as sock:
        assert sock.version() == "TLSv1.2"


def _version_only(
    port: int, name: str, ca: Path, versions: tuple[ssl.TLSVersion, ssl.TLSVersion]
) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.check_hostname = False  # the certificate is a.example.com's; SNI chooses the server
    if versions[0] < ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.minimum_version, ctx.maximum_version = versions
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        return ctx.wrap_socket(raw, server_hostname=name)
    except BaseException:
        raw.close()
        raise


def test_cipher_suites_limit_tls_1_2_ciphers(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, ca = pki["a"], pki["ca"]
    served = serve(
        _server(
            "https",
            '["a.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {a.cert}, privateKey: {a.key}, "
            "cipherSuites: [ECDHE-ECDSA-AES256-GCM-SHA384]}",
        )
    )
    port = served.ports[0]
    v12 = (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    with _handshake(port, "a.example.com", ca.path, versions=v12) as sock:
        cipher = sock.cipher()
        assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    assert _refused(
        lambda: _handshake(
            port, "a.example.com", ca.path, versions=v12, ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"
        )
    )


def test_alpn_h2_gives_http2_and_http11_otherwise(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a, ca = pki["a"], pki["ca"]
    served = serve(
        _server(
            "https",
            '["a.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {a.cert}, privateKey: {a.key}}}",
        )
    )
    port = served.ports[0]
    ctx = ssl.create_default_context(cafile=str(ca.path))
    # Connect to 127.0.0.1 with the SNI (and certificate name) set explicitly.
    transport = httpx.HTTPTransport(http2=True, verify=ctx)
    with httpx.Client(transport=transport) as client:
        response = client.get(
            f"https://127.0.0.1:{port}/",
            headers={"host": "a.example.com"},
            extensions={"sni_hostname": "a.example.com"},
        )
    assert response.http_version == "HTTP/2"
    assert response.json()["version"] == "2"
    with httpx.Client(verify=ctx) as client:
        response = client.get(
            f"https://127.0.0.1:{port}/",
            headers={"host": "a.example.com"},
            extensions={"sni_hostname": "a.example.com"},
        )
    assert response.http_version == "HTTP/1.1"
    assert response.json()["version"] == "1.1"


def test_credential_name_is_read_from_the_credentials_dir_with_its_ca(
    pki: dict[str, Any], serve: Callable[..., Served], tmp_path: Path
) -> None:
    ca, client = pki["ca"], pki["client"]
    creds = tmp_path / "credentials"
    ca.issue(
        "x",
        dns=("a.example.com",),
        folder=creds / "shop-cert",
        cert_name="tls.crt",
        key_name="tls.key",
    )
    (creds / "shop-cert" / "ca.crt").write_bytes(ca.path.read_bytes())
    served = serve(
        _server("mtls", '["a.example.com"]', "{mode: MUTUAL, credentialName: shop-cert}"),
        credentials_dir=creds,
    )
    port = served.ports[0]
    assert _refused(lambda: _handshake(port, "a.example.com", ca.path))
    with _handshake(port, "a.example.com", ca.path, cert=(client.cert, client.key)) as sock:
        assert _get(sock)[1]["identity"]["dns"] == ["buyer.test"]


def test_missing_credentials_refuse_handshakes_until_the_files_appear(
    pki: dict[str, Any], serve: Callable[..., Served], tmp_path: Path
) -> None:
    ca = pki["ca"]
    creds = tmp_path / "late"
    served = serve(
        _server("https", '["a.example.com"]', "{mode: SIMPLE, credentialName: late}"),
        credentials_dir=creds,
    )
    assert served.store is not None and served.store.errors()
    port = served.ports[0]
    assert _refused(lambda: _handshake(port, "a.example.com", ca.path))
    ca.issue(
        "late",
        dns=("a.example.com",),
        folder=creds / "late",
        cert_name="tls.crt",
        key_name="tls.key",
    )
    _on_loop(served, served.store.refresh)
    with _handshake(port, "a.example.com", ca.path) as sock:
        assert _get(sock)[0] == 200


def _on_loop(served: Served, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on the server's loop (the store belongs to it) and wait for it."""

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), served.loop).result(5)


def test_rotated_certificate_is_served_to_new_connections_and_open_ones_survive(
    pki: dict[str, Any], serve: Callable[..., Served], tmp_path: Path
) -> None:
    ca = pki["ca"]
    creds = tmp_path / "rotate"
    first = ca.issue(
        "r1", dns=("a.example.com",), folder=creds / "www", cert_name="tls.crt", key_name="tls.key"
    )
    served = serve(
        _server("https", '["a.example.com"]', "{mode: SIMPLE, credentialName: www}"),
        credentials_dir=creds,
        poll_s=0.05,
    )
    port = served.ports[0]
    old = _handshake(port, "a.example.com", ca.path)
    try:
        assert _get(old)[0] == 200
        assert _serial(old) == first.serial
        second = ca.issue(
            "r2",
            dns=("a.example.com",),
            folder=creds / "www",
            cert_name="tls.crt",
            key_name="tls.key",
        )
        # The watcher polls every 50 ms; wait (bounded) for a new handshake to see it.
        deadline = time.monotonic() + 10
        serial = first.serial
        while serial != second.serial and time.monotonic() < deadline:
            with _handshake(port, "a.example.com", ca.path) as sock:
                serial = _serial(sock)
        assert serial == second.serial
        assert served.store is not None and served.store.reloads >= 1
        # The keep-alive connection opened before the rotation still works.
        assert _get(old)[0] == 200
        assert _serial(old) == first.serial
    finally:
        old.close()


def _serial(sock: ssl.SSLSocket) -> int:
    from cryptography import x509

    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_quic_can_read_the_same_certificate_material(
    pki: dict[str, Any], serve: Callable[..., Served]
) -> None:
    a = pki["a"]
    served = serve(
        _server(
            "https",
            '["a.example.com"]',
            f"{{mode: SIMPLE, serverCertificate: {a.cert}, privateKey: {a.key}}}",
        )
    )
    assert served.store is not None
    (creds,) = served.store.credentials(served.ports[0])
    assert creds.cert_pem == a.cert.read_bytes() and creds.key_file == str(a.key)
    assert creds.hosts == ("a.example.com",) and "h2" in creds.alpn
    assert served.store.credentials(1) == ()


def test_xfcc_value_has_hash_subject_uri_and_every_dns_name() -> None:
    from gateway.server.events import PeerIdentity

    value = xfcc_value(PeerIdentity('CN=a"b', ("spiffe://x/ns/a/sa/b",), ("d1", "d2"), "ab12"))
    assert value == 'Hash=ab12;Subject="CN=a\\"b";URI=spiffe://x/ns/a/sa/b;DNS=d1;DNS=d2'


class _EchoServer:
    """A plain TCP echo (passthrough never decrypts, so the bytes after the
    ClientHello can be anything); closes its side once the client half-closes."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(10)
            while True:
                data = conn.recv(1 << 16)
                if not data:
                    break
                conn.sendall(data)


def test_passthrough_splices_bytes_both_ways_with_half_close(
    serve: Callable[..., Served],
) -> None:
    echo = _EchoServer()
    served = serve(
        "    - port: {number: PORT, name: tls, protocol: TLS}\n"
        "      hosts: [db.example.com]\n"
        "      tls: {mode: PASSTHROUGH}\n"
        "---\n"
        "apiVersion: networking.istio.io/v1\n"
        "kind: ServiceEntry\n"
        "metadata: {name: db, namespace: default}\n"
        "spec:\n"
        "  hosts: [db.internal]\n"
        "  resolution: STATIC\n"
        "  ports: [{number: 5432, name: tcp, protocol: TCP}]\n"
        f"  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo.port}}}}}]\n"
        "---\n"
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: db, namespace: default}\n"
        "spec:\n"
        "  hosts: [db.example.com]\n"
        "  gateways: [edge]\n"
        "  tls:\n"
        "    - match: [{sniHosts: [db.example.com]}]\n"
        "      route: [{destination: {host: db.internal}}]\n"
    )
    hello = _client_hello("db.example.com")
    payload = hello + os.urandom(24 * 1024 * 1024)
    received = bytearray()

    def read_all(sock: socket.socket) -> None:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                return
            received.extend(chunk)

    with socket.create_connection(("127.0.0.1", served.ports[0]), timeout=10) as sock:
        reader = threading.Thread(target=read_all, args=(sock,), daemon=True)
        reader.start()
        # Writing while reading: the echo's replies must flow back through the
        # gateway while the upload is still going (back-pressure, not buffering all).
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        reader.join(30)
    assert not reader.is_alive()
    assert len(received) == len(payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


def test_passthrough_with_no_matching_route_closes_the_connection(
    serve: Callable[..., Served],
) -> None:
    served = serve(
        "    - port: {number: PORT, name: tls, protocol: TLS}\n"
        '      hosts: ["*"]\n'
        "      tls: {mode: PASSTHROUGH}\n"
    )
    with socket.create_connection(("127.0.0.1", served.ports[0]), timeout=5) as sock:
        sock.sendall(_client_hello("db.example.com"))
        # Closed with the hello unread: an RST or a plain EOF, never an answer.
        try:
            answer = sock.recv(1)
        except ConnectionResetError:
            answer = b""
        assert answer == b""
