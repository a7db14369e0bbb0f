"""egress.registry: which hosts a ServiceEntry makes an exit, compiled from YAML."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress.registry import ALLOW_ANY, EgressSettings, compile_registry, split_authority
from gateway.config.load import load_config

ENTRIES = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.test]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: egress}
spec:
  hosts: ["*.example.test"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DYNAMIC_DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: deeper, namespace: egress}
spec:
  hosts: ["*.eu.example.test"]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: DYNAMIC_DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: block, namespace: egress}
spec:
  hosts: [block.internal]
  addresses: [10.1.0.0/16]
  ports: [{number: 5432, name: tcp, protocol: TCP}]
  location: MESH_INTERNAL
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: team}
spec:
  hosts: [private.example.org]
  exportTo: ["."]
  ports: [{number: 80, name: http, protocol: HTTP}]
  resolution: DNS
"""


@pytest.fixture
def registry(tmp_path: Path):
    (tmp_path / "entries.yaml").write_text(ENTRIES)
    return compile_registry(load_config([str(tmp_path)]), EgressSettings(), "istio-system")


def test_exact_host_wins_over_a_wildcard(registry) -> None:
    service = registry.lookup("api.example.test")
    assert service is not None and service.origin.name == "api"


def test_most_specific_wildcard_covers_a_name(registry) -> None:
    assert registry.lookup("www.example.test").origin.name == "wild"
    assert registry.lookup("a.b.eu.example.test").origin.name == "deeper"
    assert registry.lookup("example.test") is None


def test_ip_inside_a_declared_block_belongs_to_its_entry(registry) -> None:
    service = registry.lookup("10.1.2.3")
    assert service is not None and service.origin.name == "block"
    assert not service.external
    assert registry.lookup("10.2.0.1") is None


def test_entry_exported_only_to_its_own_namespace_is_invisible_elsewhere(
    registry, tmp_path: Path
) -> None:
    assert registry.lookup("private.example.org") is None
    seen_from_team = compile_registry(load_config([str(tmp_path)]), EgressSettings(), "team")
    assert seen_from_team.lookup("private.example.org") is not None


def test_policy_and_hosts_are_in_the_dump(registry, tmp_path: Path) -> None:
    dump = registry.to_dict()
    assert dump["outboundTrafficPolicy"] == "REGISTRY_ONLY"
    assert [h["host"] for h in dump["hosts"]] == [
        "*.eu.example.test",
        "*.example.test",
        "api.example.test",
        "block.internal",
    ]
    allow = compile_registry(
        load_config([str(tmp_path)]), EgressSettings(outbound_traffic_policy=ALLOW_ANY), "x"
    )
    assert allow.allow_any and allow.to_dict()["outboundTrafficPolicy"] == "ALLOW_ANY"


@pytest.mark.parametrize(
    ("authority", "default", "expected"),
    [
        ("API.example.test", 80, ("api.example.test", 80)),
        ("api.example.test:8443", 80, ("api.example.test", 8443)),
        ("api.example.test.:443", 80, ("api.example.test", 443)),
        ("[::1]:8080", 80, ("::1", 8080)),
        ("::1", 443, ("::1", 443)),
        ("api.example.test:http", 80, ("api.example.test", None)),
        ("api.example.test:70000", 80, ("api.example.test", None)),
    ],
)
def test_authorities_split_into_host_and_port(authority: str, default: int, expected) -> None:
    assert split_authority(authority, default) == expected
