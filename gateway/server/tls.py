"""TLS for downstream listeners: certificates, SSL contexts, SNI choice, rotation.

What this module owns:

- turning a compiled ``TLSServer`` (one Gateway server's ``tls`` block) into an
  ``ssl.SSLContext``: the certificate pair from files or from ``credentialName`` in the
  credentials directory (``<dir>/<name>/tls.crt``, ``tls.key``, ``ca.crt``), protocol
  versions (TLS 1.2 to 1.3 unless configured), TLS 1.2 cipher suites, client
  certificate verification for MUTUAL / OPTIONAL_MUTUAL, and ALPN (``h2``,
  ``http/1.1``);
- choosing the server for a connection from the SNI name in its ClientHello, the way
  Envoy picks a filter chain: an exact name, then the longest wildcard, then ``*``;
  with no match there is no filter chain and the connection is refused (Istio logs
  ``NR filter_chain_not_found``), which is what meshgate does too;
- a small ClientHello parser (SNI and ALPN), so the server can be chosen *before*
  the handshake starts. Python cannot change a connection's verify mode or protocol
  versions from an ``sni_callback`` (OpenSSL copies them when the connection is
  created), so a port mixing SIMPLE, MUTUAL and PASSTHROUGH servers needs the choice
  made up front; it also gives PASSTHROUGH its routing key without decrypting;
- watching the certificate files: a timer compares their ``stat`` stamps and, on a
  change, builds a fresh context and swaps it in for *new* handshakes. Connections
  already open keep the context they started with;
- the peer identity of a mutual-TLS connection (``PeerIdentity``), and the
  ``x-forwarded-client-cert`` value Istio's gateways send upstream;
- ``CertificateStore.credentials(port)``: the certificate and key (paths and PEM
  bytes) and TLS settings of each server on a port, for the QUIC listener to load the
  same material.

It leaves sockets to ``listeners.py`` and reading configuration to the compiler.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import ssl
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from ..routing.table import Listener, SNIRoute, TLSServer
from .events import PeerIdentity

__all__ = [
    "ALPN_PROTOCOLS",
    "CertificateStore",
    "ClientHello",
    "NotTLS",
    "PortTLS",
    "ServerCredentials",
    "ServerEntry",
    "TLSSetupError",
    "build_server_context",
    "match_sni_route",
    "parse_client_hello",
    "peer_identity",
    "resolve_credentials",
    "select_by_sni",
    "xfcc_value",
]

logger = logging.getLogger("meshgate.tls")

T = TypeVar("T")

# Offered in this order of preference; the client's order does not matter to
# OpenSSL's server side, ours does.
ALPN_PROTOCOLS: tuple[str, ...] = ("h2", "http/1.1")

_VERSIONS = {
    "TLSV1_0": ssl.TLSVersion.TLSv1,
    "TLSV1_1": ssl.TLSVersion.TLSv1_1,
    "TLSV1_2": ssl.TLSVersion.TLSv1_2,
    "TLSV1_3": ssl.TLSVersion.TLSv1_3,
}
# Istio's gateway defaults: TLS_AUTO means at least 1.2, at most 1.3.
DEFAULT_MIN_VERSION = ssl.TLSVersion.TLSv1_2
DEFAULT_MAX_VERSION = ssl.TLSVersion.TLSv1_3

TERMINATING_MODES = frozenset({"SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"})
PASSTHROUGH_MODE = "PASSTHROUGH"


class TLSSetupError(Exception):
    """A server's TLS settings cannot be turned into a working context (missing or
    unreadable files, a key that does not match, no usable cipher suite)."""


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class CredentialPaths:
    cert: str
    key: str
    ca: str | None = None


def resolve_credentials(server: TLSServer, credentials_dir: str | None) -> CredentialPaths:
    """Where a server's certificate, key and CA bundle live.

    ``credentialName`` wins over file fields, as in Istio. It names a folder in the
    credentials directory shaped like a Kubernetes TLS secret; the CA for MUTUAL comes
    from its ``ca.crt`` or, failing that, from a sibling folder ``<name>-cacert``
    (Istio's convention for a separate CA secret)."""
    if server.credential_name:
        if not credentials_dir:
            raise TLSSetupError(
                f'credentialName "{server.credential_name}" needs --credentials-dir'
            )
        folder = os.path.join(credentials_dir, server.credential_name)
        ca: str | None = None
        for candidate in (
            os.path.join(folder, "ca.crt"),
            os.path.join(f"{folder}-cacert", "ca.crt"),
        ):
            if os.path.exists(candidate):
                ca = candidate
                break
        return CredentialPaths(os.path.join(folder, "tls.crt"), os.path.join(folder, "tls.key"), ca)
    if not server.server_certificate or not server.private_key:
        raise TLSSetupError("no serverCertificate/privateKey and no credentialName")
    return CredentialPaths(server.server_certificate, server.private_key, server.ca_certificates)


def _versions(server: TLSServer) -> tuple[ssl.TLSVersion, ssl.TLSVersion]:
    """(minimum, maximum); unset and ``TLS_AUTO`` mean Istio's defaults."""
    low = _VERSIONS.get(server.min_protocol_version or "", DEFAULT_MIN_VERSION)
    high = _VERSIONS.get(server.max_protocol_version or "", DEFAULT_MAX_VERSION)
    return low, high


def build_server_context(
    server: TLSServer,
    paths: CredentialPaths,
    alpn: Sequence[str] = ALPN_PROTOCOLS,
) -> ssl.SSLContext:
    """A server-side context for one Gateway server. Raises ``TLSSetupError``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    low, high = _versions(server)
    try:
        if low < ssl.TLSVersion.TLSv1_2:
            # OpenSSL 3 refuses TLS 1.0/1.1 above security level 0; the user asked
            # for them explicitly.
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        if server.cipher_suites:
            # Only TLS 1.2 and older use this list: Python's ssl has no way to set
            # TLS 1.3 suites, so those stay OpenSSL's defaults.
            extra = ":@SECLEVEL=0" if low < ssl.TLSVersion.TLSv1_2 else ""
            ctx.set_ciphers(":".join(server.cipher_suites) + extra)
        with warnings.catch_warnings():
            # Python deprecates TLS 1.0/1.1; a Gateway may still ask for them.
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = low
            ctx.maximum_version = high
        ctx.load_cert_chain(paths.cert, paths.key)
    except FileNotFoundError as exc:
        # ssl's error names no file; the operator needs to know which one is missing.
        missing = next((p for p in (paths.cert, paths.key) if not os.path.exists(p)), None)
        where = f"{missing}: " if missing else ""
        raise TLSSetupError(f"{where}{exc.strerror or exc}") from exc
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TLSSetupError(f"{exc}") from exc
    if server.mode in ("MUTUAL", "OPTIONAL_MUTUAL"):
        if not paths.ca:
            raise TLSSetupError(f"{server.mode} needs caCertificates (or ca.crt)")
        try:
            ctx.load_verify_locations(cafile=paths.ca)
        except (OSError, ssl.SSLError) as exc:
            raise TLSSetupError(f"CA {paths.ca}: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if server.mode == "MUTUAL" else ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    # No session resumption: it would let a resumed session skip client-certificate
    # checks against a rotated CA, and full handshakes are cheap enough at the edge.
    # OP_NO_TICKET alone is not enough: under TLS 1.3 OpenSSL then issues stateful
    # tickets, and keeps every session in its server cache (up to 20,480 of them, tens
    # of MB under a handshake-heavy load). With no tickets issued at all, TLS 1.3
    # sessions are never cached.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    return ctx


# --------------------------------------------------------------------------- identity


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerIdentity | None:
    """The verified client certificate of a connection, or None without one."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        dns = tuple(san.get_values_for_type(x509.DNSName))
    return PeerIdentity(
        subject=cert.subject.rfc4514_string(),
        uris=uris,
        dns=dns,
        sha256=hashlib.sha256(der).hexdigest(),
    )


def xfcc_value(identity: PeerIdentity) -> str:
    """``x-forwarded-client-cert`` as Envoy writes it for Istio's gateways
    (``SANITIZE_SET`` with Hash, Subject, URI and DNS): one element for this hop."""
    parts = [f"Hash={identity.sha256}", 'Subject="' + identity.subject.replace('"', '\\"') + '"']
    if identity.uris:
        parts.append(f"URI={identity.uris[0]}")
    parts.extend(f"DNS={name}" for name in identity.dns)
    return ";".join(parts)


# --------------------------------------------------------------------------- ClientHello


class NotTLS(Exception):
    """The first bytes of the connection are not a TLS ClientHello."""


@dataclass(frozen=True, slots=True)
class ClientHello:
    server_name: str | None  # lower-case, None when the client sent no SNI
    alpn: tuple[str, ...] = ()


_MAX_HELLO_BYTES = 64 * 1024


def parse_client_hello(data: bytes) -> ClientHello | None:
    """SNI and ALPN from the start of a TLS connection.

    Returns None while ``data`` holds only part of the ClientHello; raises ``NotTLS``
    when it cannot be one. The handshake message may span several records (large
    post-quantum key shares do), so the fragments are joined first (RFC 8446 §5.1)."""
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) - pos < 5:
            if len(data) >= _MAX_HELLO_BYTES:
                raise NotTLS("ClientHello too large")
            return None
        content_type = data[pos]
        if content_type != 22 or data[pos + 1] != 3:
            raise NotTLS("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if length == 0 or length > 16384 + 2048:
            raise NotTLS("bad TLS record length")
        if len(data) - pos - 5 < length:
            if len(data) >= _MAX_HELLO_BYTES:
                raise NotTLS("ClientHello too large")
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotTLS("first handshake message is not a ClientHello")
            body_len = int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= 4 + body_len:
                return _hello_fields(bytes(handshake[4 : 4 + body_len]))
            if 4 + body_len > _MAX_HELLO_BYTES:
                raise NotTLS("ClientHello too large")


def _hello_fields(body: bytes) -> ClientHello:
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        if pos >= len(body):
            return ClientHello(None)
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        server_name: str | None = None
        alpn: list[str] = []
        while pos + 4 <= end:
            kind = int.from_bytes(body[pos : pos + 2], "big")
            size = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + size]
            pos += 4 + size
            if kind == 0:  # server_name (RFC 6066 §3)
                p = 2
                while p + 3 <= len(ext):
                    name_type = ext[p]
                    name_len = int.from_bytes(ext[p + 1 : p + 3], "big")
                    if name_type == 0:
                        server_name = ext[p + 3 : p + 3 + name_len].decode("ascii").lower()
                        break
                    p += 3 + name_len
            elif kind == 16:  # application_layer_protocol_negotiation (RFC 7301)
                p = 2
                while p < len(ext):
                    n = ext[p]
                    alpn.append(ext[p + 1 : p + 1 + n].decode("latin-1"))
                    p += 1 + n
    except (IndexError, UnicodeDecodeError) as exc:
        raise NotTLS(f"malformed ClientHello: {exc}") from exc
    return ClientHello(server_name.rstrip(".") if server_name else None, tuple(alpn))


# --------------------------------------------------------------------------- SNI choice


def _host_rank(pattern: str, name: str | None) -> int:
    """How well ``pattern`` covers ``name``: -1 not at all; higher is more specific."""
    if pattern == "*":
        return 0
    if name is None:
        return -1
    if pattern.startswith("*."):
        suffix = pattern[1:]
        return len(suffix) if name.endswith(suffix) and len(name) > len(suffix) else -1
    return 1_000_000 if pattern == name else -1


def select_by_sni(items: Iterable[tuple[Sequence[str], T]], name: str | None) -> T | None:
    """The item whose host patterns cover ``name`` best: exact, then the longest
    ``*.suffix``, then ``*``; the first declared wins a tie (Envoy's filter-chain
    match on ``server_names``). None when nothing covers it."""
    best: T | None = None
    best_rank = -1
    for patterns, item in items:
        rank = max((_host_rank(p, name) for p in patterns), default=-1)
        if rank > best_rank:
            best, best_rank = item, rank
    return best


def match_sni_route(routes: Sequence[SNIRoute], name: str | None) -> SNIRoute | None:
    """The passthrough route for an SNI name (most specific match wins)."""
    return select_by_sni(((r.sni_hosts, r) for r in routes), name)


# --------------------------------------------------------------------------- the store


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    if not path:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


@dataclass(slots=True)
class ServerEntry:
    """One Gateway server on a TLS port and its current context.

    ``context`` is None for PASSTHROUGH and while the credentials cannot be loaded
    (handshakes for this server are then refused, as Envoy does while a secret is
    missing); ``error`` says why."""

    server: TLSServer
    context: ssl.SSLContext | None = None
    error: str = ""
    paths: CredentialPaths | None = None
    stamps: tuple[tuple[int, int, int] | None, ...] = ()
    generation: int = 0  # bumped on every successful (re)load

    @property
    def passthrough(self) -> bool:
        return self.server.mode == PASSTHROUGH_MODE


@dataclass(frozen=True, slots=True)
class ServerCredentials:
    """A server's certificate material and TLS settings, for another listener (QUIC)
    to load: paths and the PEM bytes read at the last (re)load."""

    hosts: tuple[str, ...]
    mode: str
    cert_file: str
    key_file: str
    ca_file: str | None
    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes | None
    min_version: ssl.TLSVersion
    max_version: ssl.TLSVersion
    cipher_suites: tuple[str, ...]
    alpn: tuple[str, ...]
    generation: int


@dataclass(slots=True)
class PortTLS:
    """The TLS servers of one listener port, and its passthrough routes."""

    listener: Listener
    entries: list[ServerEntry] = field(default_factory=list)

    def select(self, server_name: str | None) -> ServerEntry | None:
        return select_by_sni(((e.server.hosts, e) for e in self.entries), server_name)


class CertificateStore:
    """The contexts of every TLS server of a Snapshot, kept fresh from disk."""

    def __init__(
        self,
        listeners: Iterable[Listener],
        credentials_dir: str | None = None,
        alpn: Sequence[str] = ALPN_PROTOCOLS,
    ) -> None:
        self.credentials_dir = credentials_dir
        self.alpn = tuple(alpn)
        self.ports: dict[int, PortTLS] = {}
        for listener in listeners:
            if not listener.tls_servers:
                continue
            port_tls = PortTLS(listener)
            for server in listener.tls_servers:
                entry = ServerEntry(server)
                self._load(entry)
                port_tls.entries.append(entry)
            self.ports[listener.port] = port_tls
        self._task: asyncio.Task[None] | None = None
        self.reloads = 0  # successful rotations since start, for tests and metrics

    def apply(self, listeners: Iterable[Listener]) -> None:
        """Follow a reload: the TLS listeners of the new Snapshot. A server whose
        ``tls`` block is unchanged keeps its entry (and its loaded context); a new or
        changed one is loaded now; ports no longer listed are dropped. The PortTLS of
        a port that stays is updated in place, so its bound socket sees the change
        on the next handshake; open connections keep what they negotiated."""
        ports: dict[int, PortTLS] = {}
        for listener in listeners:
            if not listener.tls_servers:
                continue
            port_tls = self.ports.get(listener.port)
            old_entries = list(port_tls.entries) if port_tls is not None else []
            entries: list[ServerEntry] = []
            for server in listener.tls_servers:
                entry = next((e for e in old_entries if e.server == server), None)
                if entry is None:
                    entry = ServerEntry(server)
                    self._load(entry)
                else:
                    old_entries.remove(entry)
                entries.append(entry)
            if port_tls is None:
                port_tls = PortTLS(listener)
            else:
                port_tls.listener = listener
            port_tls.entries = entries
            ports[listener.port] = port_tls
        self.ports = ports

    # -- loading ------------------------------------------------------------------

    def _load(self, entry: ServerEntry) -> bool:
        """(Re)build one entry's context; True when it changed."""
        if entry.passthrough:
            return False
        server = entry.server
        if server.mode not in TERMINATING_MODES:
            entry.error = f"TLS mode {server.mode} is not supported by meshgate"
            return False
        try:
            paths = resolve_credentials(server, self.credentials_dir)
        except TLSSetupError as exc:
            entry.error = str(exc)
            return False
        stamps = (_stamp(paths.cert), _stamp(paths.key), _stamp(paths.ca))
        if entry.context is not None and stamps == entry.stamps and paths == entry.paths:
            return False
        try:
            context = build_server_context(server, paths, self.alpn)
        except TLSSetupError as exc:
            # Keep serving with the last good context: a half-written file during a
            # rotation must not take the server down. Retry on the next poll.
            message = f"{server.origin.ref} hosts {','.join(server.hosts)}: {exc}"
            if message != entry.error:
                logger.error("TLS credentials not loaded: %s", message)
            entry.error = message
            return False
        entry.context = context
        entry.paths = paths
        entry.stamps = stamps
        entry.error = ""
        entry.generation += 1
        return True

    def refresh(self) -> int:
        """Check every server's files once; returns how many contexts were rebuilt."""
        changed = 0
        for port_tls in self.ports.values():
            for entry in port_tls.entries:
                if self._load(entry):
                    changed += 1
                    if entry.generation > 1:
                        self.reloads += 1
                        logger.info(
                            "TLS certificate reloaded for %s (port %d)",
                            ",".join(entry.server.hosts),
                            port_tls.listener.port,
                        )
        return changed

    def errors(self) -> list[str]:
        """Why some servers cannot complete handshakes right now."""
        return [
            f"port {port}: {entry.error}"
            for port, port_tls in sorted(self.ports.items())
            for entry in port_tls.entries
            if entry.error
        ]

    # -- watching -----------------------------------------------------------------

    def start(self, poll_s: float) -> None:
        """Poll the certificate files every ``poll_s`` seconds (0 disables)."""
        if poll_s > 0 and self.ports and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(poll_s))

    async def _watch(self, poll_s: float) -> None:
        # A stat per file per interval is cheaper and more portable than inotify, and
        # it also sees Kubernetes' atomic symlink swaps of mounted secrets.
        while True:
            await asyncio.sleep(poll_s)
            try:
                self.refresh()
            except Exception:  # never let the watcher die silently
                logger.exception("TLS certificate check failed")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- for other listeners (QUIC) ---------------------------------------------------

    def credentials(self, port: int) -> tuple[ServerCredentials, ...]:
        """The loaded certificate material of every terminating server on ``port``.

        HTTP/3 calls this to load the same certificates into QUIC; ``generation``
        tells it when a rotation happened (compare with the value it loaded)."""
        port_tls = self.ports.get(port)
        if port_tls is None:
            return ()
        out: list[ServerCredentials] = []
        for entry in port_tls.entries:
            paths = entry.paths
            if entry.context is None or paths is None:
                continue
            try:
                cert_pem = _read(paths.cert)
                key_pem = _read(paths.key)
                ca_pem = _read(paths.ca) if paths.ca else None
            except OSError:
                continue
            server = entry.server
            out.append(
                ServerCredentials(
                    hosts=server.hosts,
                    mode=server.mode,
                    cert_file=paths.cert,
                    key_file=paths.key,
                    ca_file=paths.ca,
                    cert_pem=cert_pem,
                    key_pem=key_pem,
                    ca_pem=ca_pem,
                    min_version=_VERSIONS.get(
                        server.min_protocol_version or "", DEFAULT_MIN_VERSION
                    ),
                    max_version=_VERSIONS.get(
                        server.max_protocol_version or "", DEFAULT_MAX_VERSION
                    ),
                    cipher_suites=server.cipher_suites,
                    alpn=self.alpn,
                    generation=entry.generation,
                )
            )
        return tuple(out)


def _read(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()
