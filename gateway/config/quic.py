"""Which Gateway servers meshgate can also offer over HTTP/3, and why not the others.

meshgate serves HTTP/3 (QUIC, on the same port number over UDP) for every HTTPS
server it terminates itself, with one QUIC stack (aioquic) whose limits decide what
can go over it:

- QUIC always runs TLS 1.3, so a server capped below it stays on TCP;
- aioquic's server side cannot ask for or check a client certificate, so MUTUAL,
  OPTIONAL_MUTUAL and ISTIO_MUTUAL servers stay on TCP (offering them over QUIC would
  silently drop the client-certificate requirement);
- PASSTHROUGH servers are never terminated, and QUIC cannot be spliced by SNI.

``http3_exclusion`` gives the reason (None when the server goes over HTTP/3);
``meshgate validate`` reports each exclusion as a warning, and the runtime uses the
same function to decide what the QUIC listener serves and whether the port is
advertised with ``alt-svc`` (only when every server on it goes over HTTP/3, since a
client told about HTTP/3 for one host would try it for all). This module does no I/O.
"""

from __future__ import annotations

__all__ = ["HTTP3_PROTOCOLS", "http3_exclusion"]

# Gateway server protocols that carry HTTP over TLS, and so get an HTTP/3 listener.
HTTP3_PROTOCOLS = frozenset({"HTTPS"})

_BELOW_TLS13 = frozenset({"TLSV1_0", "TLSV1_1", "TLSV1_2"})
_CLIENT_CERT_MODES = frozenset({"MUTUAL", "OPTIONAL_MUTUAL", "ISTIO_MUTUAL"})
_PASSTHROUGH_MODES = frozenset({"PASSTHROUGH", "AUTO_PASSTHROUGH"})


def http3_exclusion(
    protocol: str, mode: str | None, max_protocol_version: str | None
) -> tuple[str, str] | None:
    """Why an HTTPS server is not served over HTTP/3: (the ``tls`` field responsible,
    in YAML spelling, and the reason), or None when it is.

    Servers of other protocols are not HTTPS and never get HTTP/3: also None."""
    if protocol.upper() not in HTTP3_PROTOCOLS:
        return None
    mode = (mode or "SIMPLE").upper()
    if mode in _PASSTHROUGH_MODES:
        return "mode", (
            f"{mode} servers are not offered over HTTP/3: QUIC cannot be forwarded by SNI "
            "without terminating it"
        )
    if mode in _CLIENT_CERT_MODES:
        return "mode", (
            f"{mode} servers are not offered over HTTP/3: meshgate's QUIC stack cannot "
            "request or verify client certificates; clients use HTTP/1.1 or HTTP/2, and "
            "the port is not advertised with alt-svc"
        )
    if max_protocol_version is not None and max_protocol_version.upper() in _BELOW_TLS13:
        return "maxProtocolVersion", (
            f"maxProtocolVersion {max_protocol_version} excludes HTTP/3, which always runs "
            "TLS 1.3; clients use HTTP/1.1 or HTTP/2, and the port is not advertised with "
            "alt-svc"
        )
    return None
