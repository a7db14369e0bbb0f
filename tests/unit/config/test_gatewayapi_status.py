"""Gateway API status details the golden cases cannot show: certificateRefs checked
against a real credentials directory, and what ``validate`` prints for them."""

from __future__ import annotations

from pathlib import Path

from gateway.config.gatewayapi_status import bind_gateway_api, status_warnings
from gateway.config.load import load_config

CONFIG = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: infra}
spec:
  gatewayClassName: meshgate
  listeners:
  - name: present
    port: 8443
    protocol: HTTPS
    hostname: a.example.com
    tls: {certificateRefs: [{name: here}]}
  - name: absent
    port: 8443
    protocol: HTTPS
    hostname: b.example.com
    tls: {certificateRefs: [{name: missing}]}
"""


def _conditions(tmp_path: Path, credentials: Path | None) -> dict[str, dict[str, tuple]]:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    binding = bind_gateway_api(
        load_config([str(path)]), ("meshgate",), str(credentials) if credentials else None
    )
    (gateway,) = binding.gateways
    return {
        lb.spec.name: {c.type: (c.status, c.reason) for c in lb.conditions}
        for lb in gateway.listeners
    }


def test_certificate_ref_without_files_is_an_invalid_certificate_ref(tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    (creds / "here").mkdir(parents=True)
    for name in ("tls.crt", "tls.key"):
        (creds / "here" / name).write_text("placeholder", encoding="utf-8")
    listeners = _conditions(tmp_path, creds)
    assert listeners["present"]["ResolvedRefs"] == (True, "ResolvedRefs")
    assert listeners["present"]["Programmed"] == (True, "Programmed")
    assert listeners["absent"]["ResolvedRefs"] == (False, "InvalidCertificateRef")
    assert listeners["absent"]["Programmed"] == (False, "Invalid")


def test_without_a_credentials_directory_files_are_not_looked_for(tmp_path: Path) -> None:
    listeners = _conditions(tmp_path, None)
    assert listeners["absent"]["ResolvedRefs"] == (True, "ResolvedRefs")


def test_missing_secret_warning_names_the_listener_field(tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(CONFIG, encoding="utf-8")
    binding = bind_gateway_api(load_config([str(path)]), ("meshgate",), str(tmp_path / "none"))
    texts = [str(w) for w in status_warnings(binding)]
    assert any(
        "Gateway infra/edge: spec.listeners[1].tls.certificateRefs[0]: "
        "ResolvedRefs=False (InvalidCertificateRef): Secret infra/missing not found" in t
        for t in texts
    ), texts
