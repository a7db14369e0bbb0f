"""Semantic validation of parsed resources: errors Istio would refuse, warnings
``istioctl analyze`` would print, and notes on what this version does not enforce.

    check(resources)    -> (errors, warnings), never raises
    validate(resources) -> Model, or raises ConfigErrors holding every error

Errors follow Istio's own validation (ranges, one-of fields, regexes, durations).
Warnings never fail: references to things that do not exist (a Gateway, a
ServiceEntry, a subset), route rules that can never match, weights that are
normalised, and every field that is accepted but not yet enforced.

Types and unknown fields are ``parse.py``'s concern; by the time a resource gets here
its spec is a typed object. Each message names the field path in YAML spelling and
is placed at the line of that node (or its nearest ancestor).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .durations import DurationError, parse_duration_s
from .errors import ConfigError, ConfigErrors, Model
from .gatewayapi import check_gateway_api
from .hosts import MESH_GATEWAY, expand_host, gateway_ref, host_matches, split_server_host
from .parse import child_path
from .quic import http3_exclusion
from .ratelimit import check_rate_limit_policy
from .resources import (
    ClientTLSSettings,
    ConnectionPoolSettings,
    CorsPolicy,
    Destination,
    DestinationRuleSpec,
    GatewaySpec,
    HeaderOperations,
    Headers,
    HTTPFaultInjection,
    HTTPMatchRequest,
    HTTPRedirect,
    HTTPRoute,
    LoadBalancerSettings,
    OutlierDetection,
    Percent,
    RequestAuthenticationSpec,
    Resource,
    ServerTLSSettings,
    ServiceEntrySpec,
    StringMatch,
    TLSRoute,
    TrafficPolicy,
    VirtualServiceSpec,
    yaml_name,
)

__all__ = ["NOT_ENFORCED", "check", "validate"]

NOT_ENFORCED = "not yet enforced"

GATEWAY_PROTOCOLS = ("GRPC", "HTTP", "HTTP2", "HTTPS", "MONGO", "TCP", "TLS")
SERVER_TLS_MODES = (
    "PASSTHROUGH",
    "SIMPLE",
    "MUTUAL",
    "AUTO_PASSTHROUGH",
    "ISTIO_MUTUAL",
    "OPTIONAL_MUTUAL",
)
CLIENT_TLS_MODES = ("DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL")
TLS_VERSIONS = ("TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")
LB_SIMPLE = ("UNSPECIFIED", "RANDOM", "PASSTHROUGH", "ROUND_ROBIN", "LEAST_REQUEST", "LEAST_CONN")
# Envoy retry conditions meshgate acts on (gateway.policy.RetryPolicy); others warn.
RETRY_ON = (
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
)
DERIVE_PORT = ("FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT")
H2_UPGRADE = ("DEFAULT", "DO_NOT_UPGRADE", "UPGRADE")
# DYNAMIC_DNS is Istio 1.28's resolution for wildcard hosts; meshgate resolves each name
# a request asks for at the egress gateway (docs/egress.md).
RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS")
LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
CORS_METHODS = ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")
UNMATCHED_PREFLIGHTS = ("FORWARD", "IGNORE")

# RFC 9110 token characters; a leading ":" allows HTTP/2 pseudo-headers in matches.
_TOKEN = re.compile(r":?[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# DNS-1123 label, compared case-insensitively (meshgate lower-cases hosts).
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", re.IGNORECASE)
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")  # Kubernetes object name


# --------------------------------------------------------------------------- reporting


class _Report:
    """Collects the problems of one resource, each placed at its field's line."""

    def __init__(
        self, resource: Resource, errors: list[ConfigError], warnings: list[ConfigError]
    ) -> None:
        self.resource = resource
        self.namespace = resource.metadata.namespace
        self._errors = errors
        self._warnings = warnings

    def _make(self, path: str, message: str, warning: bool) -> ConfigError:
        r = self.resource
        return ConfigError(
            r.kind,
            r.metadata.namespace,
            r.metadata.name,
            path,
            message,
            source=r.where(path),
            warning=warning,
        )

    def error(self, path: str, message: str) -> None:
        self._errors.append(self._make(path, message, False))

    def warn(self, path: str, message: str) -> None:
        self._warnings.append(self._make(path, message, True))

    # ---------------------------------------------------------------- shared checks

    def port(self, path: str, number: int | None) -> None:
        if number is not None and not 1 <= number <= 65535:
            self.error(path, f"port {number} is outside 1..65535")

    def duration(self, path: str, text: str | None, *, whole_seconds: bool = False) -> None:
        if text is None:
            return
        try:
            seconds = parse_duration_s(text)
        except DurationError as exc:
            self.error(path, str(exc))
            return
        if whole_seconds and seconds != int(seconds):
            self.error(path, f'"{text}" must be whole seconds')

    def regex(self, path: str, pattern: str) -> None:
        # Istio expects RE2 syntax; Python's re accepts the RE2 patterns people write
        # (it lacks only RE2's \C and a few named classes), so compiling here catches
        # what Envoy would refuse.
        try:
            re.compile(pattern)
        except re.error as exc:
            self.error(path, f'regex "{pattern}" does not compile: {exc}')

    def percent(self, path: str, value: float | None) -> None:
        if value is not None and not 0 <= value <= 100:
            self.error(path, f"{_num(value)} is outside 0..100")

    def percentage(self, path: str, value: Percent | None) -> None:
        if value is not None:
            self.percent(f"{path}.value", value.value)

    def one_of(self, path: str, value: str | None, valid: Sequence[str], what: str) -> None:
        if value is not None and value not in valid:
            self.error(path, f'unknown {what} "{value}"; valid values: {", ".join(valid)}')

    def non_negative(self, path: str, obj: Any) -> None:
        """Every integer field of ``obj`` is >= 0 (counts and limits)."""
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, int) and not isinstance(value, bool) and value < 0:
                name = f.metadata.get("yaml") or yaml_name(f.name)
                self.error(f"{path}.{name}", f"{value} must not be negative")

    def header_name(self, path: str, name: str) -> None:
        if not _TOKEN.fullmatch(name):
            self.error(path, f'header name "{name}" is not a valid HTTP token')

    def host(self, path: str, host: str, *, allow_star: bool = True) -> None:
        problem = _host_problem(host, allow_star=allow_star)
        if problem:
            self.error(path, problem)

    def string_match(self, path: str, match: StringMatch, *, presence_ok: bool) -> None:
        set_fields = [
            name for name in ("exact", "prefix", "regex") if getattr(match, name) is not None
        ]
        if len(set_fields) > 1:
            self.error(
                path, f"only one of exact, prefix or regex may be set; found {_and(set_fields)}"
            )
        elif not set_fields and not presence_ok:
            self.error(path, "one of exact, prefix or regex is required")
        if match.regex is not None:
            self.regex(f"{path}.regex", match.regex)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _and(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host_problem(host: str, *, allow_star: bool) -> str | None:
    """Why ``host`` is not an Istio host name (``*``, ``*.suffix``, FQDN, short name, IP)."""
    if not host:
        return "host must not be empty"
    if host == "*":
        return None if allow_star else '"*" alone is not allowed here; name the hosts'
    if _is_ip(host):
        return None
    if len(host) > 255:
        return f'host "{host}" is longer than 255 characters'
    labels = host.removesuffix(".").split(".")
    for i, label in enumerate(labels):
        if i == 0 and label == "*":
            continue
        if not _LABEL.fullmatch(label):
            return f'"{host}" is not a valid host name (label "{label}" is invalid)'
    if len(labels) > 1 and labels[-1].isdigit():
        return f'"{host}" is not a valid host name (the last label cannot be all digits)'
    return None


# --------------------------------------------------------------------------- metadata


def _check_metadata(r: _Report) -> None:
    meta = r.resource.metadata
    if not _NAME.fullmatch(meta.name):
        r.error(
            "metadata.name",
            f'"{meta.name}" is not a valid name '
            "(lower-case letters, digits, '-' and '.', starting and ending alphanumeric)",
        )
    elif isinstance(r.resource.spec, GatewaySpec) and not _LABEL.fullmatch(meta.name):
        # VirtualServices refer to Gateways as "ns/name", so a dot is not allowed.
        r.error("metadata.name", f'"{meta.name}" is not a valid Gateway name (no dots)')
    if not (_LABEL.fullmatch(meta.namespace) and meta.namespace == meta.namespace.lower()):
        r.error("metadata.namespace", f'"{meta.namespace}" is not a valid namespace name')


# --------------------------------------------------------------------------- Gateway


def _check_gateway(r: _Report, spec: GatewaySpec) -> None:
    if not spec.servers:
        r.error("spec.servers", "at least one server is required")
    port_names: dict[str, int] = {}
    for i, server in enumerate(spec.servers):
        p = f"spec.servers[{i}]"
        port = server.port
        r.port(f"{p}.port.number", port.number)
        r.port(f"{p}.port.targetPort", port.target_port)
        protocol = port.protocol.upper()
        if protocol not in GATEWAY_PROTOCOLS:
            r.one_of(f"{p}.port.protocol", port.protocol, GATEWAY_PROTOCOLS, "protocol")
        if not port.name:
            r.error(f"{p}.port.name", "port name must not be empty")
        elif port.name in port_names:
            r.error(
                f"{p}.port.name",
                f'port name "{port.name}" is already used by spec.servers[{port_names[port.name]}]',
            )
        else:
            port_names[port.name] = i
        # meshgate listens on --address and forwards by route, never to a default endpoint.
        for name, value in (("bind", server.bind), ("defaultEndpoint", server.default_endpoint)):
            if value is not None:
                r.warn(f"{p}.{name}", NOT_ENFORCED)
        if not server.hosts:
            r.error(f"{p}.hosts", "at least one host is required")
        for j, entry in enumerate(server.hosts):
            namespace, host = split_server_host(entry, r.namespace)
            if namespace != "*" and not _LABEL.fullmatch(namespace):
                r.error(f"{p}.hosts[{j}]", f'"{namespace}" in "{entry}" is not a valid namespace')
            r.host(f"{p}.hosts[{j}]", host)
        if server.tls is None:
            if protocol in ("HTTPS", "TLS"):
                r.error(p, f"{protocol} servers need tls settings")
        else:
            _check_server_tls(r, f"{p}.tls", server.tls, protocol)
            # Reported, never dropped in silence: what the QUIC listener will not serve.
            excluded = http3_exclusion(protocol, server.tls.mode, server.tls.max_protocol_version)
            if excluded is not None:
                r.warn(f"{p}.tls.{excluded[0]}", excluded[1])


def _check_server_tls(r: _Report, path: str, tls: ServerTLSSettings, protocol: str) -> None:
    r.one_of(f"{path}.mode", tls.mode, SERVER_TLS_MODES, "TLS mode")
    low, high = tls.min_protocol_version, tls.max_protocol_version
    r.one_of(f"{path}.minProtocolVersion", low, TLS_VERSIONS, "TLS version")
    r.one_of(f"{path}.maxProtocolVersion", high, TLS_VERSIONS, "TLS version")
    if (
        low in TLS_VERSIONS[1:]
        and high in TLS_VERSIONS[1:]
        and TLS_VERSIONS.index(low) > TLS_VERSIONS.index(high)
    ):
        r.error(
            f"{path}.maxProtocolVersion",
            f"maxProtocolVersion {high} is lower than minProtocolVersion {low}",
        )
    if protocol not in ("HTTPS", "TLS"):
        return  # plain-text ports only use tls for httpsRedirect
    if tls.mode == "ISTIO_MUTUAL":
        for name, value in (
            ("serverCertificate", tls.server_certificate),
            ("privateKey", tls.private_key),
            ("caCertificates", tls.ca_certificates),
        ):
            if value:
                r.error(f"{path}.{name}", f"ISTIO_MUTUAL TLS cannot set {name}")
    terminating = tls.mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")
    # As in Istio's validation, credentialNames and tlsCertificates (1.26) stand in for
    # the certificate pair, and caCertCredentialName (1.28) for caCertificates. The
    # messages name only what meshgate serves: the others are warned about below.
    if terminating and not (tls.credential_name or tls.credential_names):
        if not tls.tls_certificates and (not tls.server_certificate or not tls.private_key):
            r.error(
                path,
                f"{tls.mode} TLS needs credentialName, or serverCertificate and privateKey",
            )
        ca_given = (
            tls.ca_certificates
            or tls.ca_cert_credential_name
            or any(cert.ca_certificates for cert in tls.tls_certificates)
        )
        if tls.mode != "SIMPLE" and not ca_given:
            r.error(path, f"{tls.mode} TLS needs caCertificates (or credentialName)")
    for i, cert in enumerate(tls.tls_certificates):
        if terminating and (not cert.server_certificate or not cert.private_key):
            r.error(
                f"{path}.tlsCertificates[{i}]",
                f"{tls.mode} TLS needs serverCertificate and privateKey",
            )
    # What the TLS listener does not do (gateway/server/tls.py): say so rather than
    # accept it in silence.
    if tls.mode in ("ISTIO_MUTUAL", "AUTO_PASSTHROUGH"):
        r.warn(f"{path}.mode", f"{tls.mode} is not supported: handshakes for this server fail")
    elif protocol == "TLS" and tls.mode != "PASSTHROUGH":
        r.warn(
            f"{path}.mode",
            f"{tls.mode} on a TLS (TCP) server is not supported: handshakes for it fail",
        )
    for name, value in (
        ("caCrl", tls.ca_crl),
        ("caCertCredentialName", tls.ca_cert_credential_name),
        ("verifyCertificateSpki", tls.verify_certificate_spki),
        ("verifyCertificateHash", tls.verify_certificate_hash),
    ):
        if value:
            r.warn(f"{path}.{name}", NOT_ENFORCED)
    # The TLS listener loads one certificate, from credentialName or the file pair; a
    # server that names its certificates only these newer ways has none to present.
    has_certificate = tls.credential_name or (tls.server_certificate and tls.private_key)
    for name, value in (
        ("credentialNames", tls.credential_names),
        ("tlsCertificates", tls.tls_certificates),
    ):
        if value:
            hint = (
                "; with no credentialName or serverCertificate and privateKey, "
                "handshakes for this server fail"
                if terminating and not has_certificate
                else ""
            )
            r.warn(f"{path}.{name}", NOT_ENFORCED + hint)
    known = _openssl_ciphers()
    for i, suite in enumerate(tls.cipher_suites):
        if suite not in known:
            r.error(
                f"{path}.cipherSuites[{i}]",
                f'unknown cipher suite "{suite}"; use OpenSSL names such as '
                "ECDHE-RSA-AES128-GCM-SHA256 (TLS 1.3 suites are not configurable)",
            )


@functools.cache
def _openssl_ciphers() -> frozenset[str]:
    """Every TLS 1.2-and-older cipher name the local OpenSSL knows."""
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return frozenset(c["name"] for c in ctx.get_ciphers() if c["protocol"] != "TLSv1.3")


# --------------------------------------------------------------------------- VirtualService


def _check_virtual_service(r: _Report, spec: VirtualServiceSpec, is_delegate: bool) -> None:
    if not spec.hosts and not is_delegate:
        r.error(
            "spec.hosts",
            "at least one host is required (only a delegate VirtualService may have none)",
        )
    for i, host in enumerate(spec.hosts):
        r.host(f"spec.hosts[{i}]", host)
    for i, route in enumerate(spec.http):
        _check_http_route(r, f"spec.http[{i}]", route)
    for i, route in enumerate(spec.tls):
        _check_tls_route(r, f"spec.tls[{i}]", route)
    for name, value in (("tcp", spec.tcp), ("exportTo", spec.export_to)):
        if value:
            r.warn(f"spec.{name}", NOT_ENFORCED)


def _check_tls_route(r: _Report, p: str, route: TLSRoute) -> None:
    """A ``tls[]`` route: SNI matches to TCP destinations, for PASSTHROUGH servers."""
    if not route.match:
        r.error(f"{p}.match", "at least one match with sniHosts is required")
    for j, entry in enumerate(route.match):
        mp = f"{p}.match[{j}]"
        if not entry.sni_hosts:
            r.error(f"{mp}.sniHosts", "at least one SNI host is required")
        for k, host in enumerate(entry.sni_hosts):
            r.host(f"{mp}.sniHosts[{k}]", host)
        r.port(f"{mp}.port", entry.port)
        for name, value in (
            ("destinationSubnets", entry.destination_subnets),
            ("sourceLabels", entry.source_labels),
            ("sourceNamespace", entry.source_namespace),
        ):
            if value:
                r.warn(f"{mp}.{name}", NOT_ENFORCED)
    if not route.route:
        r.error(f"{p}.route", "at least one destination is required")
    in_range = True
    for k, dest in enumerate(route.route):
        dp = f"{p}.route[{k}]"
        _check_destination(r, f"{dp}.destination", dest.destination)
        if dest.weight is not None and not 0 <= dest.weight <= 100:
            r.error(f"{dp}.weight", f"weight {dest.weight} is outside 0..100")
            in_range = False
    if len(route.route) > 1 and in_range and sum(d.weight or 0 for d in route.route) == 0:
        r.error(f"{p}.route", "weights add up to 0; give at least one destination a weight")


def _check_http_route(r: _Report, p: str, route: HTTPRoute) -> None:
    actions = [
        name
        for name, value in (
            ("route", route.route),
            ("redirect", route.redirect),
            ("directResponse", route.direct_response),
            ("delegate", route.delegate),
        )
        if value
    ]
    if not actions:
        r.error(p, "one of route, redirect, directResponse or delegate is required")
    elif len(actions) > 1:
        r.error(
            p,
            "only one of route, redirect, directResponse or delegate may be set; "
            f"found {_and(actions)}",
        )
    if route.redirect is not None and route.rewrite is not None:
        r.error(f"{p}.rewrite", "rewrite cannot be combined with redirect")
    if route.redirect is not None and route.fault is not None:
        r.error(f"{p}.fault", "fault cannot be combined with redirect")

    for j, match in enumerate(route.match):
        _check_match(r, f"{p}.match[{j}]", match)
    _check_destinations(r, p, route)
    if route.redirect is not None:
        _check_redirect(r, f"{p}.redirect", route.redirect)
    if route.direct_response is not None:
        dp = f"{p}.directResponse"
        status = route.direct_response.status
        if not 200 <= status <= 599:
            r.error(f"{dp}.status", f"status {status} is outside 200..599")
        body = route.direct_response.body
        if body is not None:
            if body.string is not None and body.bytes is not None:
                r.error(f"{dp}.body", "only one of string or bytes may be set")
            if body.bytes is not None:
                try:
                    base64.b64decode(body.bytes, validate=True)
                except (binascii.Error, ValueError):
                    r.error(f"{dp}.body.bytes", "bytes must be base64")
    if route.rewrite is not None:
        rw = route.rewrite
        if rw.uri is not None and rw.uri_regex_rewrite is not None:
            r.error(f"{p}.rewrite", "only one of uri or uriRegexRewrite may be set")
        if rw.uri is None and rw.uri_regex_rewrite is None and rw.authority is None:
            r.error(f"{p}.rewrite", "rewrite needs uri, uriRegexRewrite or authority")
        if rw.uri_regex_rewrite is not None:
            if not rw.uri_regex_rewrite.match:
                r.error(f"{p}.rewrite.uriRegexRewrite.match", "match must not be empty")
            else:
                r.regex(f"{p}.rewrite.uriRegexRewrite.match", rw.uri_regex_rewrite.match)
    r.duration(f"{p}.timeout", route.timeout)
    if route.retries is not None:
        for condition in (route.retries.retry_on or "").split(","):
            condition = condition.strip()
            if condition and condition not in RETRY_ON and not condition.isdigit():
                r.warn(f"{p}.retries.retryOn", f'condition "{condition}" {NOT_ENFORCED}')
        if route.retries.attempts is not None and route.retries.attempts < 0:
            r.error(f"{p}.retries.attempts", f"{route.retries.attempts} must not be negative")
        r.duration(f"{p}.retries.perTryTimeout", route.retries.per_try_timeout)
        r.duration(f"{p}.retries.backoff", route.retries.backoff)
    if route.fault is not None:
        _check_fault(r, f"{p}.fault", route.fault)
    if route.mirror is not None:
        _check_destination(r, f"{p}.mirror", route.mirror)
    if route.mirror_percentage is not None:
        r.percentage(f"{p}.mirrorPercentage", route.mirror_percentage)
    for name, value in (
        ("mirrorPercent", route.mirror_percent),
        ("mirror_percent", route.mirror_percent_snake),
    ):
        if value is not None:
            r.percent(f"{p}.{name}", value)
            r.warn(f"{p}.{name}", f"{NOT_ENFORCED}; use mirrorPercentage")
    if route.delegate is not None:
        r.warn(f"{p}.delegate", NOT_ENFORCED)
    if route.cors_policy is not None:
        _check_cors(r, f"{p}.corsPolicy", route.cors_policy)
    _check_headers(r, f"{p}.headers", route.headers)


def _check_match(r: _Report, mp: str, match: HTTPMatchRequest) -> None:
    for name in ("uri", "scheme", "method", "authority"):
        value = getattr(match, name)
        if value is not None:
            r.string_match(f"{mp}.{name}", value, presence_ok=False)
    # An empty StringMatch on a header or query parameter means "present" (and for
    # withoutHeaders, "absent"), as Istio documents.
    for field_name, values in (
        ("headers", match.headers),
        ("withoutHeaders", match.without_headers),
    ):
        for key, value in values.items():
            path = child_path(f"{mp}.{field_name}", key)
            if key.startswith("@request.auth.claims"):
                # Istio's gateway-only claim match: the rest names a (nested) claim.
                claim = key[len("@request.auth.claims") :]
                if field_name != "headers":
                    r.error(path, "claim matches are supported in headers only")
                elif not claim.startswith(".") or "" in claim[1:].split("."):
                    r.error(path, 'expected "@request.auth.claims.<name>[.<nested>...]"')
            else:
                r.header_name(path, key)
            r.string_match(path, value, presence_ok=True)
    for key, value in match.query_params.items():
        path = child_path(f"{mp}.queryParams", key)
        if not key:
            r.error(path, "query parameter name must not be empty")
        r.string_match(path, value, presence_ok=True)
    r.port(f"{mp}.port", match.port)
    if match.source_namespace is not None:
        r.warn(f"{mp}.sourceNamespace", NOT_ENFORCED)
    if match.stat_prefix is not None:
        r.warn(f"{mp}.statPrefix", NOT_ENFORCED)


def _check_destination(r: _Report, path: str, destination: Destination) -> None:
    if destination.host == "*":
        r.error(f"{path}.host", '"*" is not a destination; name a host')
    else:
        r.host(f"{path}.host", destination.host)
    if destination.subset is not None and not _LABEL.fullmatch(destination.subset):
        r.error(f"{path}.subset", f'"{destination.subset}" is not a valid subset name')
    if destination.port is not None:
        r.port(f"{path}.port.number", destination.port.number)


def _check_destinations(r: _Report, p: str, route: HTTPRoute) -> None:
    in_range = True
    for k, dest in enumerate(route.route):
        dp = f"{p}.route[{k}]"
        _check_destination(r, f"{dp}.destination", dest.destination)
        if dest.weight is not None and not 0 <= dest.weight <= 100:
            r.error(f"{dp}.weight", f"weight {dest.weight} is outside 0..100")
            in_range = False
        _check_headers(r, f"{dp}.headers", dest.headers)
    if len(route.route) > 1 and in_range:
        total = sum(dest.weight or 0 for dest in route.route)
        if total == 0:
            r.error(f"{p}.route", "weights add up to 0; give at least one destination a weight")
        elif total != 100:
            # Istio normalises: each destination gets weight/total of the traffic.
            r.warn(
                f"{p}.route",
                f"weights add up to {total}, not 100; traffic is split in proportion to them",
            )


def _check_redirect(r: _Report, rp: str, redirect: HTTPRedirect) -> None:
    if not (
        redirect.uri
        or redirect.authority
        or redirect.scheme
        or redirect.port is not None
        or redirect.derive_port is not None
    ):
        r.error(rp, "redirect needs at least one of uri, authority, scheme, port or derivePort")
    code = redirect.redirect_code
    if code is not None and not 300 <= code <= 399:
        r.error(f"{rp}.redirectCode", f"redirectCode {code} is not a 3xx status")
    if redirect.scheme is not None and redirect.scheme not in ("http", "https"):
        r.error(f"{rp}.scheme", f'scheme "{redirect.scheme}" must be "http" or "https"')
    r.port(f"{rp}.port", redirect.port)
    r.one_of(f"{rp}.derivePort", redirect.derive_port, DERIVE_PORT, "derivePort")
    if redirect.port is not None and redirect.derive_port is not None:
        r.error(f"{rp}.derivePort", "port and derivePort cannot both be set")


def _check_fault(r: _Report, fp: str, fault: HTTPFaultInjection) -> None:
    if fault.delay is None and fault.abort is None:
        r.error(fp, "fault needs a delay, an abort or both")
    if fault.delay is not None:
        delay = fault.delay
        dp = f"{fp}.delay"
        if (delay.fixed_delay is None) == (delay.exponential_delay is None):
            r.error(dp, "exactly one of fixedDelay or exponentialDelay is required")
        r.duration(f"{dp}.fixedDelay", delay.fixed_delay)
        r.duration(f"{dp}.exponentialDelay", delay.exponential_delay)
        if delay.exponential_delay is not None:
            r.warn(f"{dp}.exponentialDelay", NOT_ENFORCED)
        r.percentage(f"{dp}.percentage", delay.percentage)
        r.percent(f"{dp}.percent", delay.percent)
    if fault.abort is not None:
        abort = fault.abort
        ap = f"{fp}.abort"
        kinds = [
            name
            for name, value in (
                ("httpStatus", abort.http_status),
                ("grpcStatus", abort.grpc_status),
                ("http2Error", abort.http2_error),
            )
            if value is not None
        ]
        if len(kinds) != 1:
            r.error(ap, "exactly one of httpStatus, grpcStatus or http2Error is required")
        if abort.http2_error is not None:
            r.warn(f"{ap}.http2Error", NOT_ENFORCED)
        if abort.http_status is not None and not 200 <= abort.http_status <= 599:
            r.error(f"{ap}.httpStatus", f"status {abort.http_status} is outside 200..599")
        r.percentage(f"{ap}.percentage", abort.percentage)


def _check_cors(r: _Report, cp: str, cors: CorsPolicy) -> None:
    for i, origin in enumerate(cors.allow_origins):
        r.string_match(f"{cp}.allowOrigins[{i}]", origin, presence_ok=False)
    for i, method in enumerate(cors.allow_methods):
        if method not in CORS_METHODS:
            r.error(
                f"{cp}.allowMethods[{i}]",
                f'"{method}" is not a supported method; valid values: {", ".join(CORS_METHODS)}',
            )
    for field_name, names in (
        ("allowHeaders", cors.allow_headers),
        ("exposeHeaders", cors.expose_headers),
    ):
        for i, name in enumerate(names):
            r.header_name(f"{cp}.{field_name}[{i}]", name)
    # Access-Control-Max-Age is in seconds, so Istio refuses anything finer.
    r.duration(f"{cp}.maxAge", cors.max_age, whole_seconds=True)
    r.one_of(
        f"{cp}.unmatchedPreflights",
        cors.unmatched_preflights,
        UNMATCHED_PREFLIGHTS,
        "unmatchedPreflights value",
    )


def _check_headers(r: _Report, hp: str, headers: Headers | None) -> None:
    if headers is None:
        return
    for side, ops in (("request", headers.request), ("response", headers.response)):
        if ops is not None:
            _check_header_ops(r, f"{hp}.{side}", ops, request=side == "request")


def _check_header_ops(r: _Report, path: str, ops: HeaderOperations, *, request: bool) -> None:
    def name_ok(p: str, name: str, *, writes: bool) -> None:
        r.header_name(p, name)
        if name.startswith(":") and not (request and writes and name.lower() == ":authority"):
            r.error(p, f'pseudo-header "{name}" cannot be changed')

    for field_name, values in (("set", ops.set), ("add", ops.add)):
        for name in values:
            name_ok(child_path(f"{path}.{field_name}", name), name, writes=True)
    for i, name in enumerate(ops.remove):
        name_ok(f"{path}.remove[{i}]", name, writes=False)


# --------------------------------------------------------------------------- DestinationRule


def _check_destination_rule(r: _Report, spec: DestinationRuleSpec) -> None:
    r.host("spec.host", spec.host)
    _check_traffic_policy(r, "spec.trafficPolicy", spec.traffic_policy)
    names: dict[str, int] = {}
    for i, subset in enumerate(spec.subsets):
        sp = f"spec.subsets[{i}]"
        if not subset.name:
            r.error(f"{sp}.name", "subset name must not be empty")
        elif subset.name in names:
            r.error(
                f"{sp}.name",
                f'subset "{subset.name}" is already defined at spec.subsets[{names[subset.name]}]',
            )
        else:
            names[subset.name] = i
            if not _LABEL.fullmatch(subset.name):
                r.error(f"{sp}.name", f'"{subset.name}" is not a valid subset name')
        _check_traffic_policy(r, f"{sp}.trafficPolicy", subset.traffic_policy)
    if spec.workload_selector is not None:
        r.warn("spec.workloadSelector", NOT_ENFORCED)
    if spec.export_to:
        r.warn("spec.exportTo", NOT_ENFORCED)


def _check_traffic_policy(r: _Report, tp: str, policy: Any) -> None:
    """``policy`` is a TrafficPolicy or a PortTrafficPolicy (same fields, fewer of them)."""
    if policy is None:
        return
    if policy.load_balancer is not None:
        _check_load_balancer(r, f"{tp}.loadBalancer", policy.load_balancer)
    if policy.connection_pool is not None:
        _check_connection_pool(r, f"{tp}.connectionPool", policy.connection_pool)
    if policy.outlier_detection is not None:
        _check_outlier_detection(r, f"{tp}.outlierDetection", policy.outlier_detection)
    if policy.tls is not None:
        _check_client_tls(r, f"{tp}.tls", policy.tls)
    if isinstance(policy, TrafficPolicy):
        for i, port_policy in enumerate(policy.port_level_settings):
            pp = f"{tp}.portLevelSettings[{i}]"
            if port_policy.port is None:
                r.error(pp, "port is required")
            else:
                r.port(f"{pp}.port.number", port_policy.port.number)
            _check_traffic_policy(r, pp, port_policy)
        for name, value in (("tunnel", policy.tunnel), ("proxyProtocol", policy.proxy_protocol)):
            if value is not None:
                r.warn(f"{tp}.{name}", NOT_ENFORCED)
        if policy.retry_budget is not None:
            r.percent(f"{tp}.retryBudget.percent", policy.retry_budget.percent)
            r.non_negative(f"{tp}.retryBudget", policy.retry_budget)
            r.warn(f"{tp}.retryBudget", NOT_ENFORCED)


def _check_load_balancer(r: _Report, lp: str, lb: LoadBalancerSettings) -> None:
    r.one_of(f"{lp}.simple", lb.simple, LB_SIMPLE, "load balancer")
    if lb.simple is not None and lb.consistent_hash is not None:
        r.error(lp, "only one of simple or consistentHash may be set")
    if lb.consistent_hash is not None:
        ch = lb.consistent_hash
        keys = [
            name
            for name, value in (
                ("httpHeaderName", ch.http_header_name),
                ("httpCookie", ch.http_cookie),
                ("useSourceIp", ch.use_source_ip or None),
                ("httpQueryParameterName", ch.http_query_parameter_name),
            )
            if value is not None
        ]
        if len(keys) != 1:
            found = f"; found {_and(keys)}" if keys else ""
            r.error(
                f"{lp}.consistentHash",
                "exactly one of httpHeaderName, httpCookie, useSourceIp or "
                f"httpQueryParameterName is required{found}",
            )
        if ch.ring_hash is not None and ch.maglev is not None:
            r.error(f"{lp}.consistentHash", "only one of ringHash or maglev may be set")
    r.duration(f"{lp}.warmupDurationSecs", lb.warmup_duration_secs)
    if lb.warmup is not None:
        wp = f"{lp}.warmup"
        r.duration(f"{wp}.duration", lb.warmup.duration)
        r.percent(f"{wp}.minimumPercent", lb.warmup.minimum_percent)
        if lb.warmup.aggression is not None and lb.warmup.aggression < 0:
            r.error(f"{wp}.aggression", f"{_num(lb.warmup.aggression)} must not be negative")
    for name, value in (
        ("localityLbSetting", lb.locality_lb_setting),
        ("warmupDurationSecs", lb.warmup_duration_secs),
        ("warmup", lb.warmup),
    ):
        if value is not None:
            r.warn(f"{lp}.{name}", NOT_ENFORCED)


def _check_connection_pool(r: _Report, cp: str, pool: ConnectionPoolSettings) -> None:
    if pool.tcp is not None:
        r.non_negative(f"{cp}.tcp", pool.tcp)
        r.duration(f"{cp}.tcp.connectTimeout", pool.tcp.connect_timeout)
        r.duration(f"{cp}.tcp.maxConnectionDuration", pool.tcp.max_connection_duration)
        r.duration(f"{cp}.tcp.idleTimeout", pool.tcp.idle_timeout)
        for name, value in (
            ("tcpKeepalive", pool.tcp.tcp_keepalive),
            ("maxConnectionDuration", pool.tcp.max_connection_duration),
        ):
            if value is not None:
                r.warn(f"{cp}.tcp.{name}", NOT_ENFORCED)
    if pool.http is not None:
        r.non_negative(f"{cp}.http", pool.http)
        r.duration(f"{cp}.http.idleTimeout", pool.http.idle_timeout)
        for name, value in (
            ("maxRetries", pool.http.max_retries),
            ("useClientProtocol", pool.http.use_client_protocol),
            ("maxConcurrentStreams", pool.http.max_concurrent_streams),
        ):
            if value is not None:
                r.warn(f"{cp}.http.{name}", NOT_ENFORCED)
        r.one_of(
            f"{cp}.http.h2UpgradePolicy", pool.http.h2_upgrade_policy, H2_UPGRADE, "h2UpgradePolicy"
        )


def _check_outlier_detection(r: _Report, op: str, outlier: OutlierDetection) -> None:
    r.non_negative(op, outlier)
    r.percent(f"{op}.maxEjectionPercent", outlier.max_ejection_percent)
    r.percent(f"{op}.minHealthPercent", outlier.min_health_percent)
    r.duration(f"{op}.interval", outlier.interval)
    r.duration(f"{op}.baseEjectionTime", outlier.base_ejection_time)
    for name, value in (
        ("splitExternalLocalOriginErrors", outlier.split_external_local_origin_errors),
        ("consecutiveLocalOriginFailures", outlier.consecutive_local_origin_failures),
    ):
        if value is not None:
            r.warn(f"{op}.{name}", NOT_ENFORCED)


def _check_client_tls(r: _Report, tp: str, tls: ClientTLSSettings) -> None:
    r.one_of(f"{tp}.mode", tls.mode, CLIENT_TLS_MODES, "TLS mode")
    if tls.mode == "ISTIO_MUTUAL":
        r.warn(
            f"{tp}.mode",
            f"ISTIO_MUTUAL {NOT_ENFORCED}; meshgate originates MUTUAL TLS with the files given",
        )
    if tls.ca_crl is not None:
        r.warn(f"{tp}.caCrl", NOT_ENFORCED)
    missing_pair = not tls.client_certificate or not tls.private_key
    if tls.mode == "MUTUAL" and not tls.credential_name and missing_pair:
        r.error(tp, "MUTUAL TLS needs credentialName, or clientCertificate and privateKey")


# --------------------------------------------------------------------------- ServiceEntry


def _check_service_entry(r: _Report, spec: ServiceEntrySpec) -> None:
    if not spec.hosts:
        r.error("spec.hosts", "at least one host is required")
    for i, host in enumerate(spec.hosts):
        r.host(f"spec.hosts[{i}]", host, allow_star=False)
    for i, address in enumerate(spec.addresses):
        try:
            ipaddress.ip_network(address, strict=False)
        except ValueError:
            r.error(f"spec.addresses[{i}]", f'"{address}" is not an IP address or CIDR block')

    port_names: dict[str, int] = {}
    port_numbers: dict[int, int] = {}
    for i, port in enumerate(spec.ports):
        at_number = f"spec.ports[{port_numbers.get(port.number)}]"
        at_name = f"spec.ports[{port_names.get(port.name)}]"
        pp = f"spec.ports[{i}]"
        r.port(f"{pp}.number", port.number)
        r.port(f"{pp}.targetPort", port.target_port)
        if port.number in port_numbers:
            r.error(
                f"{pp}.number",
                f"port {port.number} is already declared at {at_number}",
            )
        else:
            port_numbers[port.number] = i
        if not _LABEL.fullmatch(port.name):
            r.error(f"{pp}.name", f'"{port.name}" is not a valid port name')
        elif port.name in port_names:
            r.error(
                f"{pp}.name",
                f'port name "{port.name}" is already declared at {at_name}',
            )
        else:
            port_names[port.name] = i
        if port.protocol is not None and port.protocol.upper() not in GATEWAY_PROTOCOLS:
            r.one_of(f"{pp}.protocol", port.protocol, GATEWAY_PROTOCOLS, "protocol")

    r.one_of("spec.location", spec.location, LOCATIONS, "location")
    r.one_of("spec.resolution", spec.resolution, RESOLUTIONS, "resolution")
    resolution = spec.resolution or "NONE"
    if resolution in ("NONE", "DYNAMIC_DNS") and spec.endpoints:
        r.error("spec.endpoints", f"resolution {resolution} takes no endpoints")
    if resolution in ("DNS", "DNS_ROUND_ROBIN"):
        if not spec.endpoints:
            for i, host in enumerate(spec.hosts):
                if host.startswith("*"):
                    r.error(
                        f"spec.hosts[{i}]",
                        f'"{host}" needs endpoints: with {resolution} resolution and no '
                        "endpoints, every host is resolved, so it cannot be a wildcard "
                        "(DYNAMIC_DNS resolves each name a request asks for)",
                    )
        if resolution == "DNS_ROUND_ROBIN" and len(spec.endpoints) > 1:
            r.error("spec.endpoints", "DNS_ROUND_ROBIN resolution takes at most one endpoint")
    if spec.workload_selector is not None and spec.endpoints:
        r.error("spec.workloadSelector", "only one of workloadSelector or endpoints may be set")

    for i, endpoint in enumerate(spec.endpoints):
        ep = f"spec.endpoints[{i}]"
        address = endpoint.address or ""
        unix = address.startswith("unix://")
        if not address:
            r.error(ep, "address is required")
        elif unix:
            socket = address.removeprefix("unix://")
            if not (socket.startswith("/") or socket.startswith("@")) or socket.endswith("/"):
                r.error(f"{ep}.address", f'"{address}" must be unix:// and an absolute socket path')
            if endpoint.ports:
                r.error(f"{ep}.ports", "a unix socket endpoint takes no ports")
        elif resolution == "STATIC" and not _is_ip(address):
            r.error(
                f"{ep}.address",
                f'"{address}" must be an IP address (or unix:///path) with STATIC resolution',
            )
        elif not _is_ip(address) and _host_problem(address, allow_star=False):
            r.error(f"{ep}.address", f'"{address}" is not an IP address or a host name')
        for name, number in endpoint.ports.items():
            path = child_path(f"{ep}.ports", name)
            if name not in port_names:
                declared = ", ".join(port_names) or "none"
                r.error(path, f'port "{name}" is not declared in spec.ports (declared: {declared})')
            r.port(path, number)
        if endpoint.weight is not None and endpoint.weight < 0:
            r.error(f"{ep}.weight", f"weight {endpoint.weight} must not be negative")
        # No locality-aware balancing, network gateways or per-endpoint identity here.
        for name, value in (
            ("network", endpoint.network),
            ("locality", endpoint.locality),
            ("serviceAccount", endpoint.service_account),
        ):
            if value is not None:
                r.warn(f"{ep}.{name}", NOT_ENFORCED)
    if spec.workload_selector is not None:
        r.warn("spec.workloadSelector", NOT_ENFORCED)
    if spec.export_to:
        r.warn("spec.exportTo", NOT_ENFORCED)
    if spec.subject_alt_names:
        r.warn("spec.subjectAltNames", NOT_ENFORCED)


# --------------------------------------------------------------------------- RequestAuthentication


def _check_jwt_fields(r: _Report, spec: RequestAuthenticationSpec) -> None:
    """The JWT rule fields authn/ parses but does not act on.

    authn.validate checks what these rules mean; the "not yet enforced" notes for
    fields it leaves alone are made here, beside every other one.
    """
    for i, rule in enumerate(spec.jwt_rules):
        p = f"spec.jwtRules[{i}]"
        if rule.space_delimited_claims:
            # authn.authz splits only its built-in claims (scope, ...) on spaces.
            r.warn(f"{p}.spaceDelimitedClaims", NOT_ENFORCED)


# --------------------------------------------------------------------------- references


def _is_catch_all(match: HTTPMatchRequest) -> bool:
    """A match condition every request meets: nothing set but a "/" prefix (or nothing)."""
    uri_any = match.uri is None or match.uri == StringMatch(prefix="/")
    plain = dataclasses.replace(match, name=None, uri=None, ignore_uri_case=False)
    return uri_any and plain == HTTPMatchRequest()


class _References:
    """What other resources name: gateways, ServiceEntry hosts, DestinationRule subsets."""

    def __init__(self, resources: Sequence[Resource]) -> None:
        self.gateways = sorted(
            (r.metadata.namespace, r.metadata.name)
            for r in resources
            if isinstance(r.spec, GatewaySpec)
        )
        self.entry_hosts = [
            expand_host(host, r.metadata.namespace)
            for r in resources
            if r.kind == "ServiceEntry"
            for host in r.spec.hosts
        ]
        self.rules = [
            (expand_host(r.spec.host, r.metadata.namespace), {s.name for s in r.spec.subsets})
            for r in resources
            if r.kind == "DestinationRule"
        ]
        self.delegates = {
            (route.delegate.namespace or r.metadata.namespace, route.delegate.name)
            for r in resources
            if r.kind == "VirtualService"
            for route in r.spec.http
            if route.delegate is not None
        }

    def check(self, r: _Report, spec: VirtualServiceSpec) -> None:
        for i, ref in enumerate(spec.gateways):
            self._gateway(r, f"spec.gateways[{i}]", ref)
        catch_all: int | None = None
        for i, route in enumerate(spec.http):
            p = f"spec.http[{i}]"
            for j, match in enumerate(route.match):
                for k, ref in enumerate(match.gateways):
                    self._gateway(r, f"{p}.match[{j}].gateways[{k}]", ref)
            for k, dest in enumerate(route.route):
                self._destination(r, f"{p}.route[{k}].destination", dest.destination)
            if catch_all is not None:
                r.warn(
                    p,
                    f"never matched: spec.http[{catch_all}] above already matches every request",
                )
            elif not route.match or any(_is_catch_all(m) for m in route.match):
                catch_all = i

    def _gateway(self, r: _Report, path: str, ref: str) -> None:
        namespace, name = gateway_ref(ref, r.namespace)
        if name == MESH_GATEWAY and not namespace:
            return
        if (namespace, name) not in self.gateways:
            known = ", ".join(f"{ns}/{n}" for ns, n in self.gateways) or "none"
            r.warn(path, f'gateway "{namespace}/{name}" not found; known gateways: {known}')

    def _destination(self, r: _Report, path: str, destination: Destination) -> None:
        host = expand_host(destination.host, r.namespace)
        if host == "*":
            return
        if not any(host_matches(pattern, host) for pattern in self.entry_hosts):
            r.warn(
                f"{path}.host",
                f'no ServiceEntry for host "{host}"; requests routed here get 503',
            )
        subset = destination.subset
        if subset is not None and not any(
            subset in subsets for rule_host, subsets in self.rules if host_matches(rule_host, host)
        ):
            r.warn(
                f"{path}.subset",
                f'subset "{subset}" is not defined by any DestinationRule for host "{host}"',
            )


# --------------------------------------------------------------------------- entry points


def check(resources: Iterable[Resource]) -> tuple[list[ConfigError], list[ConfigError]]:
    """Every semantic error and warning of ``resources``, in resource order."""
    resources = list(resources)
    errors: list[ConfigError] = []
    warnings: list[ConfigError] = []
    refs = _References(resources)
    for resource in resources:
        r = _Report(resource, errors, warnings)
        _check_metadata(r)
        spec = resource.spec
        if check_gateway_api(r, spec):
            continue  # a gateway.networking.k8s.io kind, checked by its own module
        if isinstance(spec, GatewaySpec):
            _check_gateway(r, spec)
        elif isinstance(spec, VirtualServiceSpec):
            key = (resource.metadata.namespace, resource.metadata.name)
            _check_virtual_service(r, spec, key in refs.delegates)
            refs.check(r, spec)
        elif isinstance(spec, DestinationRuleSpec):
            _check_destination_rule(r, spec)
        elif isinstance(spec, ServiceEntrySpec):
            _check_service_entry(r, spec)
        elif resource.kind in ("RequestAuthentication", "AuthorizationPolicy"):
            # The security kinds' rules live beside their compiler, in authn/.
            from authn.validate import check_security

            check_security(r, resource)
            if isinstance(spec, RequestAuthenticationSpec):
                _check_jwt_fields(r, spec)
        elif resource.kind == "RateLimitPolicy":
            check_rate_limit_policy(r, spec, resources)
    return errors, warnings


def validate(resources: Sequence[Resource]) -> Model:
    """The ``Model`` of ``resources``, or ``ConfigErrors`` holding every error found."""
    errors, warnings = check(resources)
    if errors:
        raise ConfigErrors(errors, warnings)
    return Model(tuple(resources), tuple(warnings))
