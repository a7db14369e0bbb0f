"""Client-side TLS for upstream connections (DestinationRule ``trafficPolicy.tls``).

``client_context(tls, credentials_dir, alpn)`` builds one ``ssl.SSLContext`` per
cluster policy (the caller caches it):

- SIMPLE: server certificate verified against ``caCertificates`` (or the credential's
  ``ca.crt``, or the system store when neither is given), unless
  ``insecureSkipVerify``;
- MUTUAL: the same, plus the client certificate and key from ``clientCertificate`` /
  ``privateKey`` or from ``credentialName``'s ``tls.crt`` / ``tls.key``;
- ``subjectAltNames``: when set, the peer certificate must carry one of them (DNS or
  URI SAN); the host-name check is then done against that list instead of the SNI,
  as Envoy's ``match_typed_subject_alt_names`` does;
- ``sni``: the name sent in the ClientHello (``server_hostname_for``), defaulting to
  the cluster's host.

``verify_subject_alt_names`` is the post-handshake check for the SAN list.
"""

from __future__ import annotations

import os
import ssl

from ..policy import UpstreamTLS

__all__ = [
    "TLSOriginationError",
    "client_context",
    "server_hostname_for",
    "verify_subject_alt_names",
]


class TLSOriginationError(Exception):
    """The TLS settings cannot be turned into a context (missing files, bad PEM)."""


def _paths(
    tls: UpstreamTLS, credentials_dir: str | None
) -> tuple[str | None, str | None, str | None]:
    cert, key, ca = tls.client_certificate, tls.private_key, tls.ca_certificates
    if tls.credential_name:
        # Istio: credentialName wins over the file fields; the folder has the shape
        # of a Kubernetes TLS secret (tls.crt, tls.key, ca.crt).
        if not credentials_dir:
            raise TLSOriginationError(
                f'credentialName "{tls.credential_name}" needs --credentials-dir'
            )
        folder = os.path.join(credentials_dir, tls.credential_name)
        cert = os.path.join(folder, "tls.crt")
        key = os.path.join(folder, "tls.key")
        ca_file = os.path.join(folder, "ca.crt")
        ca = ca_file if os.path.exists(ca_file) else ca
        if tls.mode != "MUTUAL":
            cert = key = None
    return cert, key, ca


def client_context(
    tls: UpstreamTLS, credentials_dir: str | None = None, alpn: tuple[str, ...] = ("http/1.1",)
) -> ssl.SSLContext:
    cert, key, ca = _paths(tls, credentials_dir)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if tls.insecure_skip_verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            if ca:
                context.load_verify_locations(cafile=ca)
            else:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            # With a SAN list the identity check is ours (verify_subject_alt_names),
            # not the SNI host name's.
            context.check_hostname = not tls.subject_alt_names
        if tls.mode == "MUTUAL":
            if not cert or not key:
                raise TLSOriginationError("MUTUAL needs clientCertificate and privateKey")
            context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise TLSOriginationError(f"upstream TLS settings: {exc}") from exc
    context.set_alpn_protocols(list(alpn))
    return context


def server_hostname_for(tls: UpstreamTLS, host: str) -> str:
    """The SNI to send: ``sni`` when set, else the cluster's host name."""
    return tls.sni or host


def verify_subject_alt_names(ssl_object: ssl.SSLObject | None, wanted: tuple[str, ...]) -> bool:
    """True when the peer certificate carries one of ``wanted`` as a DNS or URI SAN."""
    if not wanted:
        return True
    if ssl_object is None:
        return False
    cert = ssl_object.getpeercert()
    if not cert:
        return False
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "URI")}
    return any(name in names for name in wanted)
