"""Client TLS contexts for upstreams: what is verified, and clear errors for settings
that cannot work."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from gateway.policy import UpstreamTLS
from gateway.upstream.tls import (
    TLSOriginationError,
    client_context,
    server_hostname_for,
    verify_subject_alt_names,
)


def test_simple_without_ca_verifies_against_the_system_store_and_checks_the_name() -> None:
    context = client_context(UpstreamTLS("SIMPLE"))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_subject_alt_names_replace_the_host_name_check() -> None:
    context = client_context(UpstreamTLS("SIMPLE", subject_alt_names=("spiffe://x/y",)))
    assert context.verify_mode == ssl.CERT_REQUIRED and not context.check_hostname


def test_insecure_skip_verify_turns_verification_off() -> None:
    context = client_context(UpstreamTLS("SIMPLE", insecure_skip_verify=True))
    assert context.verify_mode == ssl.CERT_NONE


def test_mutual_without_a_key_pair_is_refused() -> None:
    with pytest.raises(TLSOriginationError, match="clientCertificate"):
        client_context(UpstreamTLS("MUTUAL"))


def test_missing_ca_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TLSOriginationError, match="upstream TLS settings"):
        client_context(UpstreamTLS("SIMPLE", ca_certificates=str(tmp_path / "nope.crt")))


def test_credential_name_needs_a_credentials_directory() -> None:
    with pytest.raises(TLSOriginationError, match="--credentials-dir"):
        client_context(UpstreamTLS("MUTUAL", credential_name="client"))


def test_sni_defaults_to_the_cluster_host() -> None:
    assert server_hostname_for(UpstreamTLS("SIMPLE"), "api.local") == "api.local"
    assert server_hostname_for(UpstreamTLS("SIMPLE", sni="x.internal"), "api.local") == "x.internal"


def test_san_check_fails_without_a_peer_certificate() -> None:
    assert verify_subject_alt_names(None, ()) is True
    assert verify_subject_alt_names(None, ("backend.internal",)) is False
