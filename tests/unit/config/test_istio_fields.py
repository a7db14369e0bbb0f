"""Fields of Istio's API (up to 1.28) that meshgate parses but does not act on.

Each one loads, is checked where Istio checks it, and gets a "not yet enforced"
warning placed at its own line; a misspelt field is still an unknown field. A line
of a document below that ends in ``# warn`` is where the next expected warning is.
"""

from __future__ import annotations

from pathlib import Path

import jsonschema
import pytest
import yaml

from gateway.config import ConfigErrors, load_config
from gateway.config.crd import crd_for, strict_schema
from gateway.config.resources import (
    RetryBudget,
    TLSCertificate,
    WarmupConfiguration,
)
from gateway.config.validate import NOT_ENFORCED

NO_CERTIFICATE = (
    f"{NOT_ENFORCED}; with no credentialName or serverCertificate and privateKey, "
    "handshakes for this server fail"
)

GATEWAY = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [shop.example.test]
    tls:
      mode: SIMPLE
      credentialNames: [shop-rsa, shop-ecdsa]  # warn
  - port: {number: 8443, name: https-files, protocol: HTTPS}
    hosts: [files.example.test]
    tls:
      mode: MUTUAL
      tlsCertificates:  # warn
      - {serverCertificate: /etc/certs/rsa.crt, privateKey: /etc/certs/rsa.key}
      - {serverCertificate: /etc/certs/ec.crt, privateKey: /etc/certs/ec.key}
      caCertCredentialName: client-ca  # warn
  - port: {number: 9443, name: https-both, protocol: HTTPS}
    hosts: [both.example.test]
    tls:
      mode: SIMPLE
      credentialName: both-rsa
      credentialNames: [both-rsa, both-ecdsa]  # warn
  - port: {number: 80, name: http, protocol: HTTP}
    bind: 0.0.0.0  # warn
    defaultEndpoint: 127.0.0.1:8080  # warn
    hosts: [shop.example.test]
"""
GATEWAY_WARNINGS = [
    ("spec.servers[0].tls.credentialNames", NO_CERTIFICATE),
    ("spec.servers[1].tls.tlsCertificates", NO_CERTIFICATE),
    ("spec.servers[1].tls.caCertCredentialName", NOT_ENFORCED),
    ("spec.servers[2].tls.credentialNames", NOT_ENFORCED),
    ("spec.servers[3].bind", NOT_ENFORCED),
    ("spec.servers[3].defaultEndpoint", NOT_ENFORCED),
]

VIRTUAL_SERVICE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop, namespace: shop}
spec:
  hosts: [shop.example.test]
  http:
  - match: [{uri: {prefix: /new}}]
    route:
    - destination: {host: shop}
    mirror: {host: shop-canary}
    mirrorPercent: 25  # warn
  - route:
    - destination: {host: shop}
    mirror: {host: shop-canary}
    mirror_percent: 5  # warn
"""
VIRTUAL_SERVICE_WARNINGS = [
    ("spec.http[0].mirrorPercent", f"{NOT_ENFORCED}; use mirrorPercentage"),
    ("spec.http[1].mirror_percent", f"{NOT_ENFORCED}; use mirrorPercentage"),
]

DESTINATION_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: shop, namespace: shop}
spec:
  host: shop
  trafficPolicy:
    retryBudget: {percent: 20, minRetryConcurrency: 3}  # warn
    loadBalancer:
      simple: LEAST_REQUEST
      warmup: {duration: 60s, minimumPercent: 10, aggression: 1.5}  # warn
    tls:
      mode: SIMPLE
      caCertificates: /etc/certs/ca.pem
      caCrl: /etc/certs/ca.crl  # warn
    portLevelSettings:
    - port: {number: 8080}
      loadBalancer:
        simple: ROUND_ROBIN
        warmup: {duration: 30s}  # warn
        localityLbSetting: {enabled: true}  # warn
  subsets:
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      retryBudget: {percent: 5.5}  # warn
"""
DESTINATION_RULE_WARNINGS = [
    ("spec.trafficPolicy.retryBudget", NOT_ENFORCED),
    ("spec.trafficPolicy.loadBalancer.warmup", NOT_ENFORCED),
    ("spec.trafficPolicy.tls.caCrl", NOT_ENFORCED),
    ("spec.trafficPolicy.portLevelSettings[0].loadBalancer.warmup", NOT_ENFORCED),
    ("spec.trafficPolicy.portLevelSettings[0].loadBalancer.localityLbSetting", NOT_ENFORCED),
    ("spec.subsets[0].trafficPolicy.retryBudget", NOT_ENFORCED),
]

SERVICE_ENTRY = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [payments.example.test]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
  subjectAltNames: [spiffe://example.test/ns/pay/sa/payments]  # warn
  endpoints:
  - address: 192.0.2.10
    network: net-east  # warn
    locality: us-east1/us-east1-b  # warn
    serviceAccount: payments  # warn
    weight: 3
"""
SERVICE_ENTRY_WARNINGS = [
    ("spec.subjectAltNames", NOT_ENFORCED),
    ("spec.endpoints[0].network", NOT_ENFORCED),
    ("spec.endpoints[0].locality", NOT_ENFORCED),
    ("spec.endpoints[0].serviceAccount", NOT_ENFORCED),
]

REQUEST_AUTHENTICATION = """\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  jwtRules:
  - issuer: https://issuer.example.test
    jwksUri: https://issuer.example.test/jwks.json
    jwks_uri: https://issuer.example.test/jwks.json  # read as jwksUri: no warning
    spaceDelimitedClaims: [roles]  # warn
"""
REQUEST_AUTHENTICATION_WARNINGS = [
    ("spec.jwtRules[0].spaceDelimitedClaims", NOT_ENFORCED),
]

DOCUMENTS = {
    "Gateway": (GATEWAY, GATEWAY_WARNINGS),
    "VirtualService": (VIRTUAL_SERVICE, VIRTUAL_SERVICE_WARNINGS),
    "DestinationRule": (DESTINATION_RULE, DESTINATION_RULE_WARNINGS),
    "ServiceEntry": (SERVICE_ENTRY, SERVICE_ENTRY_WARNINGS),
    "RequestAuthentication": (REQUEST_AUTHENTICATION, REQUEST_AUTHENTICATION_WARNINGS),
}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "istio.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _marked_lines(text: str) -> list[int]:
    return [n for n, line in enumerate(text.splitlines(), 1) if line.endswith("# warn")]


def _not_enforced(warnings) -> list[tuple[str | None, str, str]]:
    return [(w.source, w.path, w.message) for w in warnings if NOT_ENFORCED in w.message]


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_istio_field_loads_and_is_warned_as_not_yet_enforced_at_its_line(
    tmp_path: Path, kind: str
) -> None:
    text, expected = DOCUMENTS[kind]
    path = _write(tmp_path, text)
    lines = _marked_lines(text)
    assert len(lines) == len(expected), "one # warn marker per expected warning"
    model = load_config([str(path)])
    assert [r.kind for r in model.resources] == [kind]
    assert all(w.kind == kind for w in model.warnings if NOT_ENFORCED in w.message)
    assert _not_enforced(model.warnings) == [
        (f"{path}:{line}", field_path, message)
        for line, (field_path, message) in zip(lines, expected, strict=True)
    ]


def test_new_fields_are_parsed_into_typed_values(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        "---\n".join(text for text, _ in DOCUMENTS.values()),
    )
    model = load_config([str(path)])
    by_kind = {r.kind: r.spec for r in model.resources}

    servers = by_kind["Gateway"].servers
    assert servers[0].tls.credential_names == ["shop-rsa", "shop-ecdsa"]
    assert servers[1].tls.tls_certificates == [
        TLSCertificate(server_certificate="/etc/certs/rsa.crt", private_key="/etc/certs/rsa.key"),
        TLSCertificate(server_certificate="/etc/certs/ec.crt", private_key="/etc/certs/ec.key"),
    ]
    assert servers[1].tls.ca_cert_credential_name == "client-ca"
    assert (servers[3].bind, servers[3].default_endpoint) == ("0.0.0.0", "127.0.0.1:8080")

    http = by_kind["VirtualService"].http
    assert (http[0].mirror_percent, http[1].mirror_percent_snake) == (25, 5)

    policy = by_kind["DestinationRule"].traffic_policy
    assert policy.retry_budget == RetryBudget(percent=20.0, min_retry_concurrency=3)
    assert policy.load_balancer.warmup == WarmupConfiguration(
        duration="60s", minimum_percent=10.0, aggression=1.5
    )
    assert policy.tls.ca_crl == "/etc/certs/ca.crl"
    subset_policy = by_kind["DestinationRule"].subsets[0].traffic_policy
    assert subset_policy.retry_budget == RetryBudget(percent=5.5)

    endpoint = by_kind["ServiceEntry"].endpoints[0]
    assert (endpoint.network, endpoint.locality, endpoint.service_account) == (
        "net-east",
        "us-east1/us-east1-b",
        "payments",
    )

    rule = by_kind["RequestAuthentication"].jwt_rules[0]
    assert rule.space_delimited_claims == ["roles"]
    assert rule.jwks_uri_snake == rule.jwks_uri == "https://issuer.example.test/jwks.json"


@pytest.mark.parametrize("kind", sorted(DOCUMENTS))
def test_documents_with_the_new_fields_match_the_chart_crd(kind: str) -> None:
    # The CRD is generated from the same dataclasses; a Kubernetes API server with
    # strict field validation must take what meshgate takes.
    schema = strict_schema(crd_for(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    document = yaml.safe_load(DOCUMENTS[kind][0])
    jsonschema.Draft7Validator(schema).validate(document)


@pytest.mark.parametrize(
    ("kind", "old", "new", "error"),
    [
        pytest.param(
            "DestinationRule",
            "retryBudget: {percent: 20",
            "retryBudgets: {percent: 20",
            'spec.trafficPolicy: unknown field "retryBudgets"',
            id="retryBudgets",
        ),
        pytest.param(
            "DestinationRule",
            "minRetryConcurrency",
            "minRetryConcurency",
            'spec.trafficPolicy.retryBudget: unknown field "minRetryConcurency"; '
            "valid fields: minRetryConcurrency, percent",
            id="minRetryConcurency",
        ),
        pytest.param(
            "DestinationRule",
            "minimumPercent",
            "minPercent",
            'spec.trafficPolicy.loadBalancer.warmup: unknown field "minPercent"; '
            "valid fields: aggression, duration, minimumPercent",
            id="warmup.minPercent",
        ),
        pytest.param(
            "Gateway",
            "caCertCredentialName",
            "caCredentialName",
            'spec.servers[1].tls: unknown field "caCredentialName"',
            id="caCredentialName",
        ),
        pytest.param(
            "Gateway",
            "{serverCertificate: /etc/certs/ec.crt",
            "{serverCert: /etc/certs/ec.crt",
            'spec.servers[1].tls.tlsCertificates[1]: unknown field "serverCert"; '
            "valid fields: caCertificates, privateKey, serverCertificate",
            id="tlsCertificates.serverCert",
        ),
        pytest.param(
            "VirtualService",
            "mirrorPercent: 25",
            "mirrorPercents: 25",
            'spec.http[0]: unknown field "mirrorPercents"',
            id="mirrorPercents",
        ),
        pytest.param(
            "RequestAuthentication",
            "spaceDelimitedClaims",
            "spaceDelimitedClaim",
            'spec.jwtRules[0]: unknown field "spaceDelimitedClaim"',
            id="spaceDelimitedClaim",
        ),
        pytest.param(
            "RequestAuthentication",
            "jwks_uri:",
            "jwks_url:",
            'spec.jwtRules[0]: unknown field "jwks_url"',
            id="jwks_url",
        ),
        pytest.param(
            "ServiceEntry",
            "serviceAccount:",
            "service_account:",
            'spec.endpoints[0]: unknown field "service_account"',
            id="service_account",
        ),
    ],
)
def test_misspelt_field_is_still_an_unknown_field_error(
    tmp_path: Path, kind: str, old: str, new: str, error: str
) -> None:
    text = DOCUMENTS[kind][0]
    assert text.count(old) == 1
    path = _write(tmp_path, text.replace(old, new))
    with pytest.raises(ConfigErrors) as caught:
        load_config([str(path)])
    # A misspelling can also leave a requirement unmet (a MUTUAL server without its
    # CA): that is reported too, beside the unknown field.
    unknown = [str(e) for e in caught.value.errors if "unknown field" in e.message]
    assert len(unknown) == 1, [str(e) for e in caught.value.errors]
    assert error in unknown[0]


@pytest.mark.parametrize(
    ("kind", "old", "new", "error"),
    [
        pytest.param(
            "DestinationRule",
            "{percent: 20,",
            "{percent: 150,",
            "spec.trafficPolicy.retryBudget.percent: 150 is outside 0..100",
            id="retryBudget.percent",
        ),
        pytest.param(
            "DestinationRule",
            "minRetryConcurrency: 3",
            "minRetryConcurrency: -1",
            "spec.trafficPolicy.retryBudget.minRetryConcurrency: -1 must not be negative",
            id="retryBudget.minRetryConcurrency",
        ),
        pytest.param(
            "DestinationRule",
            "minimumPercent: 10",
            "minimumPercent: 101",
            "spec.trafficPolicy.loadBalancer.warmup.minimumPercent: 101 is outside 0..100",
            id="warmup.minimumPercent",
        ),
        pytest.param(
            "DestinationRule",
            "aggression: 1.5",
            "aggression: -0.5",
            "spec.trafficPolicy.loadBalancer.warmup.aggression: -0.5 must not be negative",
            id="warmup.aggression",
        ),
        pytest.param(
            "DestinationRule",
            "{duration: 30s}",
            "{duration: 30}",
            "spec.trafficPolicy.portLevelSettings[0].loadBalancer.warmup.duration: "
            "expected a string",
            id="warmup.duration",
        ),
        pytest.param(
            "VirtualService",
            "mirrorPercent: 25",
            "mirrorPercent: 120",
            "spec.http[0].mirrorPercent: 120 is outside 0..100",
            id="mirrorPercent",
        ),
        pytest.param(
            "Gateway",
            "{serverCertificate: /etc/certs/ec.crt, privateKey: /etc/certs/ec.key}",
            "{serverCertificate: /etc/certs/ec.crt}",
            "spec.servers[1].tls.tlsCertificates[1]: MUTUAL TLS needs serverCertificate "
            "and privateKey",
            id="tlsCertificates.privateKey",
        ),
        pytest.param(
            "Gateway",
            "      caCertCredentialName: client-ca  # warn\n",
            "",
            "spec.servers[1].tls: MUTUAL TLS needs caCertificates (or credentialName)",
            id="MUTUAL-without-any-CA",
        ),
    ],
)
def test_new_field_with_a_value_istio_refuses_is_an_error(
    tmp_path: Path, kind: str, old: str, new: str, error: str
) -> None:
    text = DOCUMENTS[kind][0]
    assert text.count(old) == 1
    path = _write(tmp_path, text.replace(old, new))
    with pytest.raises(ConfigErrors) as caught:
        load_config([str(path)])
    messages = [str(e) for e in caught.value.errors]
    assert len(messages) == 1, messages
    assert error in messages[0]
