"""The UDP side of every HTTPS port: bound at start, HTTP/3 loaded on first use.

A worker serving HTTPS binds UDP on the same port number for HTTP/3 from the start,
so that TCP responses can advertise it with ``alt-svc`` at once. What serves QUIC
(aioquic, the HTTP/3 adapter in ``gateway.server.http3`` and the cryptography
bindings both need) is about 13 MB of a worker's memory, which a worker whose
clients never speak QUIC would carry for nothing. So each port starts with a small
datagram protocol of its own (``QuicPort``). The first datagram loads the adapter,
builds the port's QUIC server from the certificate store's current certificates,
hands it the socket and that datagram; from then on the socket is the adapter's.
Loading takes about 0.1 to 0.2 s, once per worker, on the worker's event loop:
the client's first packet waits for it, and so does whatever else that worker is
doing at that moment.

Certificates are read when the port wakes, so rotations before that need nothing;
after it, ``refresh`` hands rotated ones to the live QUIC server. A port whose
certificates cannot be made into QUIC ones when it wakes withdraws its ``alt-svc``
and drops QUIC datagrams (clients fall back to TCP), with an error on the log.

aioquic's TLS module imports ``service_identity`` and pyOpenSSL at its top, about
2.7 MB of a worker, for one purpose: checking a *peer's* certificate, which a QUIC
server that asks for no client certificate never does. The loader below imports it
with both bound to stand-ins that import the real package on first use, so a
verifying client in the same process (``gateway.server.h3client``) still gets the
real thing.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import socket
import sys
import types
from collections.abc import Callable, Sequence
from typing import Any

from . import altsvc
from .events import RequestHandler
from .settings import ServerSettings

__all__ = ["HTTP3Listeners", "QuicPort", "start_http3", "widen_socket_buffers"]

logger = logging.getLogger("meshgate.http3")

# Receive and send buffer asked for on the UDP socket (see widen_socket_buffers).
UDP_SOCKET_BUFFER_BYTES = 4 * 1024 * 1024


def widen_socket_buffers(transport: asyncio.BaseTransport) -> None:
    """One UDP socket takes every client's datagrams; at the default receive buffer
    (about 200 KiB) a burst from many connections overflows it, and each drop costs a
    QUIC loss-recovery timeout. The kernel caps the value at net.core.rmem_max."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, UDP_SOCKET_BUFFER_BYTES)


class _ImportedOnUse(types.ModuleType):
    """Stands for a module in another module's globals: the first attribute read
    imports the real module (by name, through ``sys.modules``) and answers from it."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            # The import system probing a module (``__path__``, ``__file__``...):
            # answered as for a plain module, without importing anything.
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__name__), name)


# What aioquic.tls imports only to verify a peer's certificate (its
# ``verify_certificate``): module name -> the attributes its ``from`` imports take.
_VERIFY_ONLY: dict[str, tuple[str, ...]] = {"service_identity": (), "OpenSSL": ("crypto",)}


def import_aioquic_tls() -> None:
    """Import ``aioquic.tls`` with its verify-only packages deferred (module notes).

    Nothing happens when it is already imported, or when one of those packages is:
    then the memory is spent anyway and the plain import is the simpler one."""
    if "aioquic.tls" in sys.modules or any(name in sys.modules for name in _VERIFY_ONLY):
        return
    stand_ins: dict[str, types.ModuleType] = {}
    for name, submodules in _VERIFY_ONLY.items():
        stand_in = _ImportedOnUse(name)
        for sub in submodules:
            setattr(stand_in, sub, _ImportedOnUse(f"{name}.{sub}"))
        stand_ins[name] = stand_in
    sys.modules.update(stand_ins)
    try:
        importlib.import_module("aioquic.tls")
    finally:
        # Out of the registry again: a later ``import OpenSSL`` anywhere gets the real
        # package, and so do the stand-ins aioquic.tls keeps in its globals.
        for name, stand_in in stand_ins.items():
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]


class QuicPort(asyncio.DatagramProtocol):
    """One bound UDP port waiting for its first datagram (then ``listener`` is the
    ``gateway.server.http3.QuicListener`` serving it)."""

    def __init__(self, number: int, wake: Callable[[QuicPort], Any]) -> None:
        self.number = number  # as configured; ``port`` is what was bound (0 in tests)
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.listener: Any = None
        self.advertised = False
        self.broken = False  # woke without a usable certificate: datagrams are dropped
        self._wake = wake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        # Only the first datagram comes here: waking hands the socket over.
        if self.listener is None and not self.broken and self.transport is not None:
            try:
                self._wake(self)
            except Exception:  # never let a failed load leave the port half-awake
                logger.exception("HTTP/3 on port %d: cannot start; not served there", self.number)
                self.broken = True
                self.withdraw()
        if self.listener is not None:
            self.listener.server.datagram_received(data, addr)

    def withdraw(self) -> None:
        if self.advertised:
            self.advertised = False
            altsvc.withdraw(self.port)

    async def stop(self, drain_s: float) -> None:
        """Withdraw alt-svc, drain the QUIC connections if awake, close the socket."""
        listener, self.listener = self.listener, None
        self.broken = True  # a datagram still queued must not wake it again
        if listener is not None:
            await listener.stop(drain_s)  # closes the socket too
            return
        self.withdraw()
        if self.transport is not None:
            self.transport.close()


async def bind_quic_port(
    address: str, number: int, wake: Callable[[QuicPort], Any], *, advertise: bool
) -> QuicPort:
    """Bind UDP ``address:number`` (``SO_REUSEPORT``, as the TCP listeners, so several
    workers share it; the kernel keeps a client's datagrams on one worker). With
    ``advertise``, TCP responses on the port carry ``alt-svc`` from now until ``stop``.
    Raises OSError when the port cannot be bound."""
    loop = asyncio.get_running_loop()
    port = QuicPort(number, wake)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    transport, _ = await loop.create_datagram_endpoint(
        lambda: port, local_addr=(address, number), family=family, reuse_port=True
    )
    widen_socket_buffers(transport)
    port.port = transport.get_extra_info("sockname")[1]
    if advertise:
        port.advertised = True
        altsvc.advertise(port.port)
    return port


class HTTP3Listeners:
    """The QUIC side of every HTTPS listener of one worker, fed from the TLS side's
    certificate store so both protocols present the same certificates.

    For each HTTPS port: the servers ``gateway.config.quic.http3_exclusion`` lets
    through are served over HTTP/3; the port is advertised with ``alt-svc`` only when
    all of its servers are (a client told about HTTP/3 for one host of a port would
    try it for every host there). ``start`` returns one line per port that is not
    advertised, for the log. Certificate rotations picked up by the store reach new
    QUIC connections on the next ``refresh`` (called on the store's polling period)."""

    def __init__(self, handler: RequestHandler, settings: ServerSettings, address: str) -> None:
        self.handler = handler
        self.settings = settings
        self.address = address
        self.listeners: dict[int, QuicPort] = {}
        self._generations: dict[int, tuple[int, ...]] = {}
        self._servable: dict[int, set[tuple[str, ...]]] = {}  # host sets served over QUIC
        self._store: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, tls_listeners: Sequence[Any], store: Any) -> list[str]:
        """Bind UDP for each HTTPS listener; OSError when a port cannot be bound."""
        from ..config.quic import http3_exclusion

        self._store = store
        notes: list[str] = []
        for listener in tls_listeners:
            if listener.protocol.upper() != "HTTPS":
                continue
            servers = listener.tls_servers
            wanted = {
                tuple(s.hosts)
                for s in servers
                if http3_exclusion("HTTPS", s.mode, s.max_protocol_version) is None
            }
            offered = sum(
                1
                for c in store.credentials(listener.port)
                if tuple(c.hosts) in wanted and c.cert_pem and c.key_pem
            )
            if not offered:
                notes.append(f"port {listener.port}: no server can be offered over HTTP/3")
                continue
            advertise = offered == len(servers)
            if not advertise:
                notes.append(
                    f"port {listener.port}: HTTP/3 serves {offered} of "
                    f"{len(servers)} servers; not advertised with alt-svc"
                )
            self._servable[listener.port] = wanted
            self.listeners[listener.port] = await bind_quic_port(
                self.address, listener.port, self._wake, advertise=advertise
            )
        return notes

    def _wake(self, port: QuicPort) -> None:
        """The first datagram on ``port``: load HTTP/3 and give it the socket."""
        import_aioquic_tls()
        from . import http3  # aioquic and cryptography: the memory this module defers

        wanted = self._servable.get(port.number, set())
        certificates, generations = self._certificates(port.number, wanted)
        if not certificates or port.transport is None:
            logger.error(
                "HTTP/3 on port %d: no certificate could be loaded; HTTP/3 is not served "
                "there (alt-svc withdrawn)",
                port.number,
            )
            port.broken = True
            port.withdraw()
            return
        listener = http3.QuicListener(self.handler, self.settings, certificates)
        listener.port = port.port
        # The listener withdraws alt-svc when it stops.
        listener._advertised, port.advertised = port.advertised, False
        listener.attach(port.transport)
        port.listener = listener
        self._generations[port.number] = generations
        logger.debug("HTTP/3 loaded for port %d", port.number)

    def _certificates(
        self, port: int, wanted: set[tuple[str, ...]]
    ) -> tuple[list[Any], tuple[int, ...]]:
        from .http3 import quic_certificate_from_pem

        certificates: list[Any] = []
        generations: list[int] = []
        for credentials in self._store.credentials(port):
            if tuple(credentials.hosts) not in wanted:
                continue
            try:
                certificates.append(
                    quic_certificate_from_pem(
                        credentials.hosts, credentials.cert_pem, credentials.key_pem
                    )
                )
            except ValueError as exc:
                logger.error("HTTP/3 on port %d: cannot load certificate: %s", port, exc)
                continue
            generations.append(credentials.generation)
        return certificates, tuple(generations)

    def refresh(self) -> int:
        """Pick up certificates the store has reloaded; returns how many live QUIC
        servers changed (a port not yet awake reads them when it wakes)."""
        changed = 0
        for number, port in self.listeners.items():
            if port.listener is None:
                continue
            wanted = self._servable[number]
            generations = tuple(
                c.generation for c in self._store.credentials(number) if tuple(c.hosts) in wanted
            )
            if generations == self._generations.get(number):
                continue
            certificates, generations = self._certificates(number, wanted)
            if certificates:
                port.listener.update_certificates(certificates)
                self._generations[number] = generations
                changed += 1
        return changed

    def start_watch(self, poll_s: float) -> None:
        """Re-read the store every ``poll_s`` seconds (0 disables)."""
        if poll_s > 0 and self.listeners and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._watch(poll_s))

    async def _watch(self, poll_s: float) -> None:
        while True:
            await asyncio.sleep(poll_s)  # a polling period, not synchronisation
            try:
                self.refresh()
            except Exception:  # never let the watcher die silently
                logger.exception("HTTP/3 certificate refresh failed")

    async def stop_port(self, port: int, drain_s: float = 5.0) -> None:
        """``stop`` for one port (a reload removed or changed its HTTPS listener)."""
        quic_port = self.listeners.pop(port, None)
        self._generations.pop(port, None)
        self._servable.pop(port, None)
        if quic_port is not None:
            await quic_port.stop(drain_s)

    async def stop(self, drain_s: float = 5.0) -> None:
        """Withdraw alt-svc, GOAWAY every connection, drain, close the sockets."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(q.stop(drain_s) for q in self.listeners.values()))
        self.listeners.clear()


async def start_http3(
    handler: RequestHandler,
    settings: ServerSettings,
    address: str,
    tls_listeners: Sequence[Any],
    store: Any,
    cert_poll_s: float,
    say: Callable[[str], None],
) -> HTTP3Listeners:
    """The runtime's entry point: HTTP/3 for every HTTPS listener, or a line saying why
    not. A UDP port that cannot be bound leaves that port on TCP only (and without
    alt-svc) rather than stopping the gateway."""
    http3 = HTTP3Listeners(handler, settings, address)
    if store is None:
        return http3
    https = [lst for lst in tls_listeners if lst.protocol.upper() == "HTTPS"]
    for listener in https:
        try:
            notes = await http3.start([listener], store)
        except OSError as exc:
            say(f"HTTP/3 not served on UDP port {listener.port}: {exc}")
            continue
        for note in notes:
            say(f"HTTP/3: {note}")
    if http3.listeners:
        http3.start_watch(cert_poll_s)
        ports = ", ".join(str(p) for p in sorted(http3.listeners))
        say(f"serving HTTP/3 on {address} UDP ports {ports}")
    return http3
