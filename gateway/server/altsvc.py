"""Which listener ports currently advertise HTTP/3, and the ``alt-svc`` header for them.

The QUIC listener (``gateway.server.http3``) records its port here once its UDP socket
is bound, and removes it before it closes, so a client is only ever told about an
HTTP/3 endpoint that is actually up. The response path (``RequestContext.send_head``)
asks ``alt_svc_header`` for every response of a TCP request on such a port. This
module imports nothing but the event vocabulary, so that the pipeline can use it
without pulling in aioquic.
"""

from __future__ import annotations

from .events import RequestHead, ResponseHead

__all__ = ["ADVERTISED", "add_alt_svc", "advertise", "alt_svc_header", "withdraw"]

# One day, as browsers and Envoy's examples use; a client re-checks after that.
_MAX_AGE_S = 86400

# listener port -> ``alt-svc`` value. Read on every response, so it stays a plain dict;
# empty (and falsy) whenever no QUIC listener runs in this process.
ADVERTISED: dict[int, str] = {}
# How many QUIC listeners hold each port (a reload may start the new one first).
_holders: dict[int, int] = {}


def advertise(port: int) -> None:
    """A QUIC listener on ``port`` is up: answers on that port carry ``alt-svc``."""
    _holders[port] = _holders.get(port, 0) + 1
    ADVERTISED[port] = f'h3=":{port}"; ma={_MAX_AGE_S}'


def withdraw(port: int) -> None:
    """A QUIC listener on ``port`` is about to stop."""
    count = _holders.get(port, 0) - 1
    if count > 0:
        _holders[port] = count
        return
    _holders.pop(port, None)
    ADVERTISED.pop(port, None)


def alt_svc_header(port: int, http_version: str) -> str | None:
    """The value to add to a response, or None. Requests that already came over
    HTTP/3 are not told about it again."""
    if http_version == "3":
        return None
    return ADVERTISED.get(port)


def add_alt_svc(request: RequestHead, response: ResponseHead) -> None:
    """Append ``alt-svc`` to a final response when the request's port has HTTP/3 up.

    Callers check ``ADVERTISED`` first, so a process without a QUIC listener pays one
    truthiness test per response."""
    if response.status < 200:
        return
    value = alt_svc_header(request.port, request.http_version)
    if value is not None and request.scheme == "https":
        response.headers.append(("alt-svc", value))
