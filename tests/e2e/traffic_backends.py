"""Helpers (no tests) for the traffic-policy end-to-end tests: a scriptable HTTP/1.1
backend (plain or TLS, in a thread) and a throw-away certificate authority."""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import http.server
import os
import socket
import ssl
import struct
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h2.config
import h2.connection
import h2.events
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


class Recorder:
    """What one scripted backend has seen, with a condition to wait on."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.counts: dict[str, int] = defaultdict(int)
        self.cond = threading.Condition()

    def add(self, record: dict[str, Any]) -> None:
        with self.cond:
            self.requests.append(record)
            self.cond.notify_all()

    def wait_for(self, pred: Any, timeout_s: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        with self.cond:
            while True:
                for record in self.requests:
                    if pred(record):
                        return record
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name} saw no matching request: {self.requests}")
                self.cond.wait(left)

    def paths(self) -> list[str]:
        with self.cond:
            return [r["path"] for r in self.requests]


def pattern(size: int) -> bytes:
    """``size`` bytes that are not all alike, so a lost or repeated chunk shows."""
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def _handler(recorder: Recorder) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        """Query controls: ``fail=N&key=K&status=S`` (or ``fail_status=S``) answers S
        to the first N requests of key K, then 200; ``status=S`` alone always answers
        S; ``ms=N`` waits first (in the handler thread, standing in for a slow
        backend); ``bytes=N`` answers N bytes of ``pattern(N)``."""

        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            url = urlsplit(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            record = {
                "method": self.command,
                "path": url.path,
                "host": self.headers.get("host"),
                "body": body,
                "headers": dict(self.headers.items()),
                "peer_port": self.client_address[1],  # tells connections apart
            }
            recorder.add(record)
            if "ms" in query:
                time.sleep(int(query["ms"]) / 1000)  # the backend being slow is the test
            status = 200
            if "fail" in query:
                key = query.get("key", url.path)
                with recorder.cond:
                    recorder.counts[key] += 1
                    seen = recorder.counts[key]
                if seen <= int(query["fail"]):
                    # fail_status: a name the demo backend does not act on.
                    status = int(query.get("fail_status") or query.get("status", "503"))
            elif "status" in query:
                status = int(query["status"])
            payload = f"{recorder.name} {status} {len(body)}".encode()
            if "bytes" in query:
                payload = pattern(int(query["bytes"]))
            self.send_response(status)
            self.send_header("content-length", str(len(payload)))
            self.send_header("x-served-by", recorder.name)
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            pass

    return Handler


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # the default backlog of 5 would stall concurrent tests


class ScriptedBackend:
    def __init__(
        self,
        port: int,
        name: str,
        ssl_context: ssl.SSLContext | None = None,
        address: str = "127.0.0.1",
    ) -> None:
        self.recorder = Recorder(name)
        self.server = _Server((address, port), _handler(self.recorder))
        self.port = self.server.server_address[1]
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- certificates


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


class TestCA:
    """A CA that signs leaf certificates into files under ``folder``."""

    __test__ = False  # a helper, not a test class

    def __init__(self, folder: Path, name: str = "meshgate test CA") -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.key = _key()
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.ca_path = folder / f"{name.replace(' ', '-')}.crt"
        self.ca_path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, stem: str, dns: list[str], uris: list[str] = ()) -> tuple[Path, Path]:
        key = _key()
        now = datetime.datetime.now(datetime.UTC)
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(stem))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path = self.folder / f"{stem}.crt"
        key_path = self.folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        return cert_path, key_path

    def server_context(self, stem: str, dns: list[str], *, require_client: bool) -> ssl.SSLContext:
        cert, key = self.issue(stem, dns)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        if require_client:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.ca_path)
        return context


# --------------------------------------------------------------------------- HTTP/2


class H2Backend:
    """A cleartext HTTP/2 (prior knowledge) backend on ``h2``, in a thread of its own.

    ``application/grpc`` requests get their body echoed back as the response message,
    then trailers ``grpc-status: 0`` and ``grpc-message: echoed``; other requests get
    ``h2 <name> <body length>``. Every request is recorded with ``protocol: "h2"``."""

    def __init__(self, port: int, name: str) -> None:
        self.recorder = Recorder(name)
        self.name = name
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.server: asyncio.AbstractServer | None = None

        async def start() -> None:
            self.server = await asyncio.start_server(self._serve, "127.0.0.1", port)
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(start())
            self.loop.run_forever()

        threading.Thread(target=run, daemon=True).start()
        if not ready.wait(10):
            raise TimeoutError("h2 backend did not start")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        heads: dict[int, dict[str, str]] = {}
        bodies: dict[int, bytes] = defaultdict(bytes)
        while True:
            data = await reader.read(65536)
            if not data:
                break
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.RequestReceived):
                    heads[event.stream_id] = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    self._answer(
                        conn,
                        event.stream_id,
                        heads.pop(event.stream_id),
                        bodies.pop(event.stream_id, b""),
                    )
            writer.write(conn.data_to_send())
            await writer.drain()
        writer.close()

    def _answer(
        self, conn: h2.connection.H2Connection, stream_id: int, head: dict[str, str], body: bytes
    ) -> None:
        self.recorder.add(
            {
                "protocol": "h2",
                "path": head.get(":path"),
                "host": head.get(":authority"),
                "headers": head,
                "body": body,
            }
        )
        if head.get("content-type", "").startswith("application/grpc"):
            conn.send_headers(stream_id, [(":status", "200"), ("content-type", "application/grpc")])
            conn.send_data(stream_id, body)
            conn.send_headers(
                stream_id, [("grpc-status", "0"), ("grpc-message", "echoed")], end_stream=True
            )
            return
        payload = f"h2 {self.name} {len(body)}".encode()
        conn.send_headers(
            stream_id,
            [(":status", "200"), ("content-length", str(len(payload))), ("x-served-by", self.name)],
        )
        conn.send_data(stream_id, payload, end_stream=True)

    def stop(self) -> None:
        async def close() -> None:
            if self.server is not None:
                self.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


# --------------------------------------------------------------------------- WebSocket

_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def ws_frame(opcode: int, payload: bytes, *, mask: bool) -> bytes:
    """One final WebSocket frame (RFC 6455 5.2); clients must mask, servers must not."""
    head = bytearray([0x80 | opcode])
    length = len(payload)
    bit = 0x80 if mask else 0
    if length < 126:
        head.append(bit | length)
    elif length < 1 << 16:
        head.append(bit | 126)
        head += struct.pack(">H", length)
    else:
        head.append(bit | 127)
        head += struct.pack(">Q", length)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4)
    return bytes(head) + key + _xor(payload, key)


def _xor(payload: bytes, key: bytes) -> bytes:
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(payload), "big"
    )


def _recv_exact(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        chunk = sock.recv(min(count - len(data), 1 << 20))
        if not chunk:
            raise ConnectionError("closed mid-frame")
        data += chunk
    return bytes(data)


def ws_read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = _recv_exact(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack(">H", _recv_exact(sock, 2))
    elif length == 127:
        (length,) = struct.unpack(">Q", _recv_exact(sock, 8))
    key = _recv_exact(sock, 4) if second & 0x80 else None
    payload = _recv_exact(sock, length)
    return first & 0x0F, _xor(payload, key) if key else payload


def read_head(sock: socket.socket) -> tuple[bytes, bytes]:
    """An HTTP head (up to the blank line) and whatever followed it in the reads."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the head end: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class WebSocketEcho:
    """A WebSocket echo server on plain sockets, one thread per connection.
    ``/ws-refuse`` is answered ``403`` instead of being upgraded."""

    def __init__(self, port: int) -> None:
        self.recorder = Recorder("ws")
        self.sock = socket.create_server(("127.0.0.1", port), backlog=64)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                head, rest = read_head(conn)
            except ConnectionError:
                return
            lines = head.split(b"\r\n")
            path = lines[0].split(b" ")[1].decode()
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower().decode()] = value.strip().decode()
            self.recorder.add({"path": path, "headers": headers})
            if path == "/ws-refuse":
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 2\r\n\r\nno")
                return
            accept = ws_accept(headers["sec-websocket-key"].encode())
            conn.sendall(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            assert not rest  # the client waits for the 101 before sending frames
            while True:
                try:
                    opcode, payload = ws_read_frame(conn)
                except ConnectionError:
                    return
                if opcode == 8:
                    conn.sendall(ws_frame(8, payload, mask=False))
                    return
                conn.sendall(ws_frame(opcode, payload, mask=False))

    def stop(self) -> None:
        self.sock.close()
