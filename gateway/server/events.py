"""The one request/stream vocabulary every protocol adapter speaks.

HTTP/1.1 (httptools), HTTP/2 (h2) and later HTTP/3 (aioquic) each turn their wire
format into a ``RequestHead`` plus a ``DownstreamStream`` object, and hand both to the
request pipeline (``gateway.pipeline``). The pipeline never sees an httptools parser,
an h2 event or a QUIC stream; an adapter never sees a route.

Names are lower-case ``str`` and values ``str`` (latin-1 decoded, as HTTP allows any
octet); pseudo-headers are not in ``headers``: their content is in the named fields.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "DownstreamStream",
    "PeerIdentity",
    "RequestHandler",
    "RequestHead",
    "ResponseHead",
    "StreamReset",
]


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who the client proved to be with its TLS certificate (mutual TLS only).

    Filled in by the TLS layer once per connection; policy (AuthorizationPolicy's
    ``source.principal``) reads ``uris`` (SPIFFE IDs), ``dns`` and ``subject``.
    ``subject`` is RFC 4514 text (``CN=client,O=Example``); ``sha256`` the hex digest
    of the DER certificate, as Envoy's ``x-forwarded-client-cert`` ``Hash``."""

    subject: str
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    sha256: str = ""


@dataclass(slots=True)
class RequestHead:
    """A request as the pipeline sees it. Mutable on purpose: stages rewrite
    path, authority and headers on their way upstream; one instance per request."""

    method: str
    path: str  # without the query string; as received (not normalised)
    query: str  # text after "?", "" when none
    authority: str  # Host / :authority as received, may carry ":port"
    scheme: str  # "http" | "https"
    headers: list[tuple[str, str]]  # lower-case names, in arrival order, no pseudo-headers
    http_version: str = "1.1"  # "1.0" | "1.1" | "2" | "3"
    port: int = 0  # the listener port the request arrived on
    peer: str = ""  # client IP
    peer_identity: PeerIdentity | None = None  # the verified client certificate, if any
    _index: dict[str, str] | None = field(default=None, repr=False)

    def header(self, name: str) -> str | None:
        """First value of a lower-case header name (repeated values joined by ",")."""
        index = self._index
        if index is None:
            index = {}
            for key, value in self.headers:
                if key in index:
                    index[key] = index[key] + "," + value
                else:
                    index[key] = value
            self._index = index
        return index.get(name)

    def invalidate(self) -> None:
        """Call after editing ``headers`` so ``header()`` re-reads them."""
        self._index = None


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: list[tuple[str, str]]


class StreamReset(Exception):
    """The exchange was abandoned: the client reset the stream (HTTP/2 RST_STREAM), the
    connection went away, or the adapter aborted the request (e.g. body over the limit).

    Raised by ``DownstreamStream.read_body``/``send_head``/``send_body`` so the pipeline
    can stop its upstream work; other streams on the same connection are unaffected.
    ``error_code`` is the HTTP/2 error code when there is one (0 otherwise)."""

    def __init__(self, message: str = "stream reset", error_code: int = 0) -> None:
        super().__init__(message)
        self.error_code = error_code


class DownstreamStream(Protocol):
    """One request/response exchange on a downstream connection.

    The adapter creates it when a request head is complete and keeps feeding the
    request body into it; the pipeline reads the body and writes the response.
    Flow control is the adapter's: ``read_body`` waits for data (pausing the
    transport or holding HTTP/2 window updates while the pipeline is slow) and
    ``write_body`` returns only once the data may be buffered without growing
    memory past the adapter's high-water mark.
    """

    head: RequestHead

    async def read_body(self) -> bytes:
        """Next chunk of the request body; ``b""`` once the body has ended."""
        ...

    def body_complete(self) -> bool:
        """True when the whole request body has been read (or there was none)."""
        ...

    async def send_head(self, response: ResponseHead, end_stream: bool) -> None:
        """Start the response. ``end_stream`` when there is no body."""
        ...

    async def send_body(self, data: bytes, end_stream: bool) -> None:
        """Send a chunk; awaits while the client is not reading."""
        ...

    def reset(self) -> None:
        """Abort the exchange: RST_STREAM on HTTP/2, close the connection on HTTP/1.1."""
        ...


# What an adapter calls once per request, in a task of its own: the request pipeline.
RequestHandler = Callable[[DownstreamStream], Awaitable[None]]
