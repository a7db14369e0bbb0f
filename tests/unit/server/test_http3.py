"""The HTTP/3 adapter driven without sockets.

A real aioquic client connection (``gateway.server.h3client``) and aioquic's real
``QuicServer`` with meshgate's ``QuicListener`` exchange their datagrams through a
small in-memory wire. Certificates are minted here (a CA and server certificates).
The pipeline is a small echo handler using the ``DownstreamStream`` interface the way
the real pipeline does.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aioquic.asyncio.server import QuicServer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.logger import QuicLogger
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.errors import BadRequest, BodyTooLarge, GatewayError, respond_to
from gateway.server import altsvc
from gateway.server.events import DownstreamStream, RequestHead, ResponseHead, StreamReset
from gateway.server.h3client import H3Client, H3Response, client_configuration
from gateway.server.http3 import (
    H3_REQUEST_REJECTED,
    STREAM_WINDOW_BYTES,
    H3Protocol,
    QuicCertificate,
    QuicListener,
    choose_certificate,
    load_quic_certificate,
    quic_certificate_from_pem,
)
from gateway.server.settings import ServerSettings

TIMEOUT_S = 10.0
SERVER_ADDR = ("127.0.0.1", 443)
CLIENT_ADDR = ("127.0.0.1", 50000)


# --------------------------------------------------------------------------- certificates


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


class Authority:
    """A throw-away CA issuing server certificates."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name("meshgate test CA"))
            .issuer_name(_name("meshgate test CA"))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, *names: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def quic_certificate(self, *names: str) -> QuicCertificate:
        cert, key = self.issue(*names)
        return QuicCertificate(hosts=names, certificate=cert, chain=(), private_key=key)


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority()


# --------------------------------------------------------------------------- the wire


class Wire:
    """One direction of an in-memory UDP path: ``sendto`` delivers on the next loop
    turn. ``watch`` returns an event set once a predicate holds after a delivery."""

    def __init__(self, source: tuple[str, int]) -> None:
        self.source = source
        self.deliver: Callable[[bytes, tuple[str, int]], None] | None = None
        self.closed = False
        self.datagrams = 0
        self._watches: list[tuple[Callable[[], bool], asyncio.Event]] = []

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if self.closed:
            return
        self.datagrams += 1
        asyncio.get_running_loop().call_soon(self._arrive, bytes(data))

    def _arrive(self, data: bytes) -> None:
        if self.deliver is not None:
            self.deliver(data, self.source)
        for predicate, event in self._watches:
            if not event.is_set() and predicate():
                event.set()

    def watch(self, predicate: Callable[[], bool]) -> asyncio.Event:
        event = asyncio.Event()
        if predicate():
            event.set()
        self._watches.append((predicate, event))
        return event

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Pair:
    """An aioquic client and meshgate's QUIC listener joined by two wires."""

    def __init__(
        self,
        handler: Callable[[DownstreamStream], Awaitable[None]],
        certificates: list[QuicCertificate],
        ca_pem: bytes,
        settings: ServerSettings | None = None,
        server_name: str = "example.com",
        quic_logger: QuicLogger | None = None,
    ) -> None:
        self.settings = settings or ServerSettings()
        self.listener = QuicListener(handler, self.settings, certificates)
        self.listener.port = 443
        self.server = QuicServer(
            configuration=self.listener.configuration,
            create_protocol=self.listener._create_protocol,
        )
        self.listener.server = self.server
        self.to_client = Wire(SERVER_ADDR)
        self.to_server = Wire(CLIENT_ADDR)
        self.server.connection_made(self.to_client)  # type: ignore[arg-type]
        self.to_server.deliver = self.server.datagram_received
        config = client_configuration(server_name=server_name, cadata=ca_pem)
        config.quic_logger = quic_logger  # what the client received, frame by frame
        self.client = H3Client(QuicConnection(configuration=config))
        self.client.connection_made(self.to_server)  # type: ignore[arg-type]
        self.to_client.deliver = self.client.datagram_received

    async def connect(self) -> None:
        self.client.connect(SERVER_ADDR)
        async with asyncio.timeout(TIMEOUT_S):
            await self.client.wait_connected()

    @property
    def protocol(self) -> H3Protocol:
        (proto,) = self.listener.connections
        return proto

    async def request(self, *args: Any, **kwargs: Any) -> H3Response:
        async with asyncio.timeout(TIMEOUT_S):
            return await self.client.request(*args, **kwargs)


def run(coro: Awaitable[None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(30):
            await coro

    asyncio.run(bounded())


async def refuse(stream: DownstreamStream, error: GatewayError) -> None:
    """What the pipeline does with a request the adapter refused, or whose body
    broke a rule before any response: answer with the error's status."""
    head, body = respond_to(error)
    await stream.send_head(head, False)
    await stream.send_body(body, True)


async def echo(stream: DownstreamStream) -> None:
    """Reads the whole body, answers with what it saw as JSON."""
    rejection = getattr(stream, "rejection", None)
    if rejection is not None:
        await refuse(stream, rejection)
        return
    digest = hashlib.sha256()
    size = 0
    while True:
        try:
            chunk = await stream.read_body()
        except GatewayError as error:
            await refuse(stream, error)
            return
        if not chunk:
            break
        digest.update(chunk)
        size += len(chunk)
    head = stream.head
    info = {
        "method": head.method,
        "path": head.path,
        "query": head.query,
        "authority": head.authority,
        "scheme": head.scheme,
        "headers": head.headers,
        "http_version": head.http_version,
        "port": head.port,
        "peer": head.peer,
        "body_bytes": size,
        "body_sha256": digest.hexdigest(),
    }
    body = json.dumps(info).encode()
    response = ResponseHead(200, [("content-type", "application/json"), ("Connection", "close")])
    await stream.send_head(response, False)
    await stream.send_body(body, True)


async def _chunks(total: int, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield bytes((sent + i) % 251 for i in range(n))
        sent += n


def _pattern_digest(total: int, size: int = 64 * 1024) -> str:
    digest = hashlib.sha256()
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        digest.update(bytes((sent + i) % 251 for i in range(n)))
        sent += n
    return digest.hexdigest()


# --------------------------------------------------------------------------- tests


def test_request_head_is_translated_for_the_pipeline(ca: Authority) -> None:
    async def main() -> None:
        pair = Pair(echo, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        response = await pair.request(
            "GET",
            "example.com:443",
            "/a/b?x=1&y=2",
            [("x-one", "1"), ("cookie", "a=1"), ("x-two", "2"), ("cookie", "b=2")],
        )
        assert response.status == 200
        info = json.loads(response.body)
        assert info["method"] == "GET"
        assert info["path"] == "/a/b"
        assert info["query"] == "x=1&y=2"
        assert info["authority"] == "example.com:443"
        assert info["scheme"] == "https"
        assert info["http_version"] == "3"
        assert info["port"] == 443
        assert info["peer"] == "127.0.0.1"
        # Cookie crumbs joined at the first crumb's place; no pseudo-headers.
        assert info["headers"] == [["x-one", "1"], ["cookie", "a=1; b=2"], ["x-two", "2"]]
        # Connection-specific response fields never reach an HTTP/3 client.
        assert response.header("connection") is None
        assert response.header("content-type") == "application/json"

    run(main())


def test_large_bodies_stream_both_ways(ca: Authority) -> None:
    total = 6 * 1024 * 1024

    async def download(stream: DownstreamStream) -> None:
        # Echo the upload's digest, then send ``total`` bytes back.
        digest = hashlib.sha256()
        while chunk := await stream.read_body():
            digest.update(chunk)
        await stream.send_head(ResponseHead(200, [("x-upload", digest.hexdigest())]), False)
        async for chunk in _chunks(total, 256 * 1024):
            await stream.send_body(chunk, False)
        await stream.send_body(b"", True)

    async def main() -> None:
        pair = Pair(download, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        received = hashlib.sha256()
        response = await pair.request(
            "POST", "example.com", "/up", body=_chunks(total), sink=received.update
        )
        assert response.status == 200
        assert response.header("x-upload") == _pattern_digest(total)
        assert response.body_bytes == total
        assert received.hexdigest() == _pattern_digest(total, 256 * 1024)

    run(main())


def test_receive_window_moves_only_as_the_pipeline_reads(ca: Authority) -> None:
    release = asyncio.Event
    total = 2 * 1024 * 1024

    async def main() -> None:
        may_read = release()
        started = release()

        async def slow_reader(stream: DownstreamStream) -> None:
            started.set()
            await may_read.wait()
            await echo(stream)

        pair = Pair(slow_reader, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        task = asyncio.create_task(pair.request("PUT", "example.com", "/", body=_chunks(total)))
        proto = pair.protocol
        stream_id = 0

        def window_used() -> bool:
            qs = proto._quic._streams.get(stream_id)
            return qs is not None and qs.receiver.highest_offset >= STREAM_WINDOW_BYTES - 2048

        async with asyncio.timeout(TIMEOUT_S):
            await started.wait()
            await pair.to_server.watch(window_used).wait()
        quic_stream = proto._quic._streams[stream_id]
        # The client used the whole window and has more queued, yet the window moved
        # only by the HTTP/3 framing (HEADERS, DATA frame headers), which the pipeline
        # never reads: aioquic alone would have doubled it once half had arrived.
        assert quic_stream.max_stream_data_local <= STREAM_WINDOW_BYTES + 1024
        assert quic_stream.receiver.highest_offset <= quic_stream.max_stream_data_local
        assert proto._streams[stream_id]._buffered_bytes <= STREAM_WINDOW_BYTES
        assert not task.done()
        may_read.set()
        response = await task
        info = json.loads(response.body)
        assert info["body_bytes"] == total
        assert info["body_sha256"] == _pattern_digest(total)

    run(main())


def test_no_stream_credit_is_sent_once_the_request_has_ended(ca: Authority) -> None:
    # RFC 9000 13.3: no MAX_STREAM_DATA once a stream's final size is known. A client
    # that has sent its whole request (FIN) gets its response and nothing else on
    # that stream, even while the pipeline still works on it; a body still arriving
    # gets credit as the pipeline reads it (the tests above), which is what the frame
    # is for.
    async def main() -> None:
        proceed = asyncio.Event()

        async def held(stream: DownstreamStream) -> None:
            await proceed.wait()
            await echo(stream)

        logger = QuicLogger()
        pair = Pair(held, [ca.quic_certificate("example.com")], ca.pem, quic_logger=logger)
        await pair.connect()
        for body in (b"", b"", _chunks(4096)):
            proceed.clear()
            sent = pair.to_client.datagrams
            method = "GET" if body == b"" else "POST"
            task = asyncio.create_task(pair.request(method, "example.com", "/", body=body))
            # Whatever the server sends while the request is held (its ACK, at the
            # latest when its ack-delay timer fires) would carry the credit.
            async with asyncio.timeout(TIMEOUT_S):
                await pair.to_client.watch(lambda n=sent: pair.to_client.datagrams > n).wait()
            proceed.set()
            assert (await task).status == 200
        (trace,) = logger.to_dict()["traces"]
        frames = [
            frame
            for event in trace["events"]
            if event["name"] == "transport:packet_received"
            for frame in event["data"]["frames"]
        ]
        assert [f for f in frames if f["frame_type"] == "max_stream_data"] == []
        # The requests did reach their streams and were answered there.
        answered = {f["stream_id"] for f in frames if f["frame_type"] == "stream" and f["fin"]}
        assert {0, 4, 8} <= answered

    run(main())


def test_tls_output_buffers_are_freed_once_the_handshake_is_complete(ca: Authority) -> None:
    # aioquic keeps three 16 KiB buffers per connection for TLS output; a server
    # writes nothing more there after the handshake, so they go, and the connection
    # serves requests as before.
    async def main() -> None:
        pair = Pair(echo, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        assert (await pair.request("GET", "example.com", "/one")).status == 200
        assert pair.protocol._quic._crypto_buffers == {}
        assert pair.client._quic._crypto_buffers != {}  # a client's are left alone
        for path in ("/two", "/three"):
            response = await pair.request("POST", "example.com", path, body=b"x" * 5000)
            assert response.status == 200
            assert json.loads(response.body)["path"] == path

    run(main())


def test_too_many_headers_get_431_and_the_connection_stays_up(ca: Authority) -> None:
    async def main() -> None:
        settings = ServerSettings(max_request_headers=5, max_request_header_bytes=2048)
        pair = Pair(echo, [ca.quic_certificate("example.com")], ca.pem, settings)
        await pair.connect()
        many = [(f"x-h{i}", "v") for i in range(6)]
        response = await pair.request("GET", "example.com", "/", many)
        assert response.status == 431
        big = [("x-big", "v" * 3000)]
        response = await pair.request("GET", "example.com", "/", big)
        assert response.status == 431
        response = await pair.request("GET", "example.com", "/", [("x-ok", "1")])
        assert response.status == 200

    run(main())


def test_declared_body_over_the_limit_is_refused_413_before_any_body(ca: Authority) -> None:
    calls: list[tuple[str, Any]] = []

    async def counting(stream: DownstreamStream) -> None:
        calls.append((stream.head.path, type(getattr(stream, "rejection", None))))
        await echo(stream)

    async def main() -> None:
        settings = ServerSettings(max_request_body_bytes=1000)
        pair = Pair(counting, [ca.quic_certificate("example.com")], ca.pem, settings)
        await pair.connect()
        response = await pair.request(
            "POST", "example.com", "/declared", [("content-length", "5000")], b"x" * 5000
        )
        assert response.status == 413
        # Handed to the pipeline only to be answered and logged, as a refusal.
        assert calls == [("/declared", BodyTooLarge)]

    run(main())


def test_body_growing_over_the_limit_is_refused_413_through_the_pipeline(
    ca: Authority,
) -> None:
    outcome: list[str] = []

    async def reader(stream: DownstreamStream) -> None:
        try:
            while await stream.read_body():
                pass
            outcome.append("read all")
        except GatewayError as error:
            outcome.append(type(error).__name__)
            await refuse(stream, error)

    async def main() -> None:
        settings = ServerSettings(max_request_body_bytes=100_000)
        pair = Pair(reader, [ca.quic_certificate("example.com")], ca.pem, settings)
        await pair.connect()
        response = await pair.request("POST", "example.com", "/", body=_chunks(400_000))
        assert response.status == 413
        async with asyncio.timeout(TIMEOUT_S):
            while not outcome:
                await pair.to_client.watch(lambda: bool(outcome)).wait()
        assert outcome == ["BodyTooLarge"]

    run(main())


def test_body_longer_than_its_content_length_is_refused_before_the_excess_is_read(
    ca: Authority,
) -> None:
    """aioquic compares the body with Content-Length only when the stream ends; a
    pipeline forwarding the body upstream with that length must never see more. The
    pipeline's read fails (it answers 400) and the rest of the body is refused with
    STOP_SENDING H3_MESSAGE_ERROR."""
    got: list[bytes] = []
    outcome: list[str] = []
    finished = asyncio.Event()

    async def reader(stream: DownstreamStream) -> None:
        try:
            while chunk := await stream.read_body():
                got.append(chunk)
            outcome.append("read all")
        except BadRequest:
            outcome.append("malformed")
            await refuse(stream, BadRequest())
        finished.set()

    async def lying() -> AsyncIterator[bytes]:
        yield b"hello"
        yield b"GET /smuggled HTTP/1.1\r\nhost: upstream\r\n\r\n"
        await asyncio.Event().wait()  # never ends the stream: aioquic never checks

    async def main() -> None:
        pair = Pair(reader, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        proto = pair.protocol
        stops: list[int] = []
        stop_receiving = proto._stop_receiving

        def recording(stream_id: int, error_code: int) -> None:
            stops.append(error_code)
            stop_receiving(stream_id, error_code)

        proto._stop_receiving = recording  # type: ignore[method-assign]
        headers = [("content-length", "5")]
        task = asyncio.create_task(pair.request("POST", "example.com", "/", headers, lying()))
        async with asyncio.timeout(TIMEOUT_S):
            await finished.wait()
        task.cancel()
        assert outcome == ["malformed"]  # and answered 400
        assert b"".join(got) in (b"", b"hello")
        assert stops == [0x10E]  # H3_MESSAGE_ERROR, once the 400 was out

    run(main())


@pytest.mark.parametrize("path", ["/a HTTP/1.1", "/admin#x"])
def test_space_or_fragment_in_the_path_is_refused_400_before_routing(
    ca: Authority, path: str
) -> None:
    seen: list[tuple[str, Any]] = []

    async def handler(stream: DownstreamStream) -> None:
        seen.append((stream.head.path, type(getattr(stream, "rejection", None))))
        await echo(stream)

    async def main() -> None:
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        response = await pair.request("GET", "example.com", path)
        assert response.status == 400  # RFC 9114 §4.1.2 lets a server answer first
        assert (await pair.request("GET", "example.com", "/fine")).status == 200
        # The malformed one reached the pipeline only as a refusal (to be logged).
        assert seen == [(path, BadRequest), ("/fine", type(None))]

    run(main())


def test_host_must_agree_with_authority_and_is_not_passed_on(ca: Authority) -> None:
    seen: list[RequestHead] = []

    async def handler(stream: DownstreamStream) -> None:
        seen.append(stream.head)
        await echo(stream)

    async def main() -> None:
        pair = Pair(handler, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        same = await pair.request("GET", "example.com", "/same", [("host", "example.com")])
        assert same.status == 200
        other = await pair.request("GET", "example.com", "/other", [("host", "evil.example")])
        assert other.status == 400  # RFC 9114 §4.3.1: malformed
        assert [head.path for head in seen] == ["/same", "/other"]
        assert all(name != "host" for name, _ in seen[0].headers)
        assert seen[1].headers == []  # a malformed block keeps no field but pseudo ones

    run(main())


def test_client_reset_reaches_the_pipeline_as_stream_reset(ca: Authority) -> None:
    async def main() -> None:
        seen = asyncio.Event()
        outcome: list[str] = []

        async def waiting(stream: DownstreamStream) -> None:
            seen.set()
            try:
                await stream.read_body()
                outcome.append("body")
            except StreamReset:
                outcome.append("reset")

        pair = Pair(waiting, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()

        async def never_ending() -> AsyncIterator[bytes]:
            yield b"start"
            await asyncio.Event().wait()

        task = asyncio.create_task(pair.request("POST", "example.com", "/", body=never_ending()))
        async with asyncio.timeout(TIMEOUT_S):
            await seen.wait()
        # read_body returned the first chunk; the next read waits for the reset.
        pair.client.reset_stream(0)
        async with asyncio.timeout(TIMEOUT_S):
            await pair.to_server.watch(lambda: outcome == ["body"] or bool(outcome)).wait()
        task.cancel()
        assert outcome in (["body"], ["reset"])

    run(main())


def test_pipeline_failure_before_the_response_is_a_500(ca: Authority) -> None:
    async def broken(stream: DownstreamStream) -> None:
        raise RuntimeError("bug")

    async def main() -> None:
        pair = Pair(broken, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        response = await pair.request("GET", "example.com", "/")
        assert response.status == 500

    run(main())


def test_concurrent_streams_are_limited_by_quic_stream_credit(ca: Authority) -> None:
    async def main() -> None:
        running = 0
        peak = 0
        gate = asyncio.Event()
        two_running = asyncio.Event()

        async def held(stream: DownstreamStream) -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            if running >= 2:
                two_running.set()
            await gate.wait()
            running -= 1
            await stream.send_head(ResponseHead(204, []), True)

        settings = ServerSettings(max_concurrent_streams=2)
        pair = Pair(held, [ca.quic_certificate("example.com")], ca.pem, settings)
        await pair.connect()
        tasks = [asyncio.create_task(pair.request("GET", "example.com", f"/{i}")) for i in range(4)]
        async with asyncio.timeout(TIMEOUT_S):
            await two_running.wait()
        # Let the client push whatever it is allowed to.
        await pair.to_server.watch(lambda: pair.protocol.active_streams >= 2).wait()
        assert pair.protocol.active_streams == 2
        gate.set()
        responses = await asyncio.gather(*tasks)
        assert [r.status for r in responses] == [204] * 4
        assert peak == 2

    run(main())


def test_graceful_shutdown_finishes_open_streams_and_refuses_new_ones(ca: Authority) -> None:
    async def main() -> None:
        gate = asyncio.Event()
        started = asyncio.Event()

        async def slow(stream: DownstreamStream) -> None:
            if stream.head.path == "/slow":
                started.set()
                await gate.wait()
            await stream.send_head(ResponseHead(200, []), False)
            await stream.send_body(b"done", True)

        pair = Pair(slow, [ca.quic_certificate("example.com")], ca.pem)
        await pair.connect()
        slow_task = asyncio.create_task(pair.request("GET", "example.com", "/slow"))
        async with asyncio.timeout(TIMEOUT_S):
            await started.wait()
        stop_task = asyncio.create_task(pair.listener.stop(drain_s=TIMEOUT_S))
        async with asyncio.timeout(TIMEOUT_S):
            await pair.to_client.watch(lambda: pair.client.goaway_received).wait()
        late = await pair.request("GET", "example.com", "/late")
        assert late.reset_code == H3_REQUEST_REJECTED
        gate.set()
        response = await slow_task
        assert (response.status, response.body) == (200, b"done")
        async with asyncio.timeout(TIMEOUT_S):
            await stop_task
            await pair.client.terminated.wait()
        assert not pair.listener.connections

    run(main())


def test_certificate_is_chosen_by_sni(ca: Authority, tmp_path: Path) -> None:
    first = ca.quic_certificate("first.example")
    cert, key = ca.issue("*.second.example")
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    second = load_quic_certificate(
        str(tmp_path / "tls.crt"), str(tmp_path / "tls.key"), ["*.second.example"]
    )

    async def main() -> None:
        for server_name, expected in (
            ("first.example", "first.example"),
            ("api.second.example", "*.second.example"),
            ("unknown.example", None),  # no server covers it: refused, like the TCP side
        ):
            pair = Pair(echo, [first, second], ca.pem, server_name=server_name)
            if expected is None:
                with pytest.raises(ConnectionError):
                    await pair.connect()
                continue
            await pair.connect()
            peer = pair.client._quic.tls._peer_certificate
            assert peer.subject.rfc4514_string() == f"CN={expected}"
            response = await pair.request("GET", server_name, "/")
            assert response.status == 200

    run(main())


def test_sni_prefers_exact_then_longest_wildcard_then_catch_all(ca: Authority) -> None:
    catch_all = ca.quic_certificate("*")
    wide = ca.quic_certificate("*.example.test")
    narrow = ca.quic_certificate("*.api.example.test")
    exact = ca.quic_certificate("www.example.test")
    certs = [catch_all, wide, narrow, exact]
    assert choose_certificate(certs, "www.example.test") is exact
    assert choose_certificate(certs, "v1.api.example.test") is narrow
    assert choose_certificate(certs, "shop.example.test") is wide
    assert choose_certificate(certs, "other.test") is catch_all
    assert choose_certificate(certs, None) is catch_all
    assert choose_certificate([wide, exact], None) is None
    # "*.example.test" does not cover the bare parent name.
    assert choose_certificate([wide], "example.test") is None


def test_certificate_loads_from_pem_bytes_with_its_chain(ca: Authority) -> None:
    cert, key = ca.issue("pem.example")
    pem = cert.public_bytes(serialization.Encoding.PEM) + ca.pem
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    loaded = quic_certificate_from_pem(["PEM.example"], pem, key_pem)
    assert loaded.hosts == ("pem.example",)
    assert loaded.certificate == cert
    assert loaded.chain == (ca.cert,)
    with pytest.raises(ValueError):
        quic_certificate_from_pem(["x"], b"not a certificate", key_pem)


def test_alt_svc_is_advertised_only_while_a_listener_holds_the_port() -> None:
    assert altsvc.alt_svc_header(8443, "1.1") is None
    altsvc.advertise(8443)
    altsvc.advertise(8443)  # a reload starts the new listener before the old one stops
    assert altsvc.alt_svc_header(8443, "2") == 'h3=":8443"; ma=86400'
    assert altsvc.alt_svc_header(8443, "3") is None
    altsvc.withdraw(8443)
    assert altsvc.alt_svc_header(8443, "1.1") == 'h3=":8443"; ma=86400'
    altsvc.withdraw(8443)
    assert altsvc.alt_svc_header(8443, "1.1") is None
    assert not altsvc.ADVERTISED


def test_alt_svc_goes_on_final_https_responses_over_tcp_only() -> None:
    def head(version: str, scheme: str = "https") -> RequestHead:
        return RequestHead("GET", "/", "", "h", scheme, [], http_version=version, port=9443)

    altsvc.advertise(9443)
    try:
        for version in ("1.1", "2"):
            response = ResponseHead(200, [("x", "1")])
            altsvc.add_alt_svc(head(version), response)
            assert response.headers == [("x", "1"), ("alt-svc", 'h3=":9443"; ma=86400')]
        for request, status in ((head("3"), 200), (head("2", "http"), 200), (head("2"), 100)):
            response = ResponseHead(status, [])
            altsvc.add_alt_svc(request, response)
            assert response.headers == []
    finally:
        altsvc.withdraw(9443)


def test_quic_configuration_needs_a_certificate() -> None:
    with pytest.raises(ValueError):
        QuicListener(echo, ServerSettings(), [])
    assert QuicConfiguration(is_client=False).certificate is None


def test_ended_connections_are_collected_once_the_listener_is_idle(ca: Authority) -> None:
    # aioquic's connection objects are reference cycles; with the collector off, only
    # the listener's own sweep (a moment after its last connection ended) frees them.
    import gc
    import weakref

    async def main() -> None:
        from gateway.memory import MemorySweeper

        pair = Pair(echo, [ca.quic_certificate("example.com")], ca.pem)
        pair.listener.sweeper = MemorySweeper(min_interval_s=0)
        pair.listener.sweep_after_s = 0
        await pair.connect()
        assert (await pair.request("GET", "example.com", "/")).status == 200
        ended = weakref.ref(pair.protocol._quic)
        idle = pair.listener._idle
        pair.client.close()
        async with asyncio.timeout(TIMEOUT_S):
            await idle.wait()  # the server's side has ended: ConnectionTerminated
        for _ in range(100):
            if ended() is None:
                break
            await asyncio.sleep(0)
        assert ended() is None

    gc.disable()
    try:
        run(main())
    finally:
        gc.enable()
