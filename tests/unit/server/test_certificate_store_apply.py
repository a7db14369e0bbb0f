"""``CertificateStore.apply``: what a reload does to the TLS side's certificates."""

from __future__ import annotations

from pathlib import Path

from edge_config import compile_edge
from tls_certs import CA

from gateway.routing.table import Listener
from gateway.server.tls import CertificateStore


def _listeners(tmp: Path, servers: str) -> list[Listener]:
    snapshot = compile_edge(tmp, servers)
    return [listener for listener in snapshot.listeners.values() if listener.tls_servers]


def _server(port: int, name: str, host: str, pair: object) -> str:
    return (
        f"    - port: {{number: {port}, name: {name}, protocol: HTTPS}}\n"
        f"      hosts: [{host}]\n"
        f"      tls: {{mode: SIMPLE, serverCertificate: {pair.cert}, "  # type: ignore[attr-defined]
        f"privateKey: {pair.key}}}\n"  # type: ignore[attr-defined]
    )


def test_unchanged_servers_keep_their_context_and_new_ones_are_loaded(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    a = ca.issue("a", dns=("a.example.com",))
    b = ca.issue("b", dns=("b.example.com",))
    store = CertificateStore(_listeners(tmp_path, _server(8443, "a", "a.example.com", a)))
    port_tls = store.ports[8443]
    context = port_tls.entries[0].context
    assert context is not None

    store.apply(
        _listeners(
            tmp_path,
            _server(8443, "a", "a.example.com", a) + _server(8443, "b", "b.example.com", b),
        )
    )
    assert store.ports[8443] is port_tls  # updated in place: the bound socket sees it
    assert [e.server.hosts for e in port_tls.entries] == [("a.example.com",), ("b.example.com",)]
    assert port_tls.entries[0].context is context  # not reloaded
    assert port_tls.entries[1].context is not None
    assert store.errors() == []


def test_ports_no_longer_listed_are_dropped_and_new_ports_added(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    a = ca.issue("a", dns=("a.example.com",))
    store = CertificateStore(_listeners(tmp_path, _server(8443, "a", "a.example.com", a)))
    store.apply(_listeners(tmp_path, _server(9443, "a", "a.example.com", a)))
    assert sorted(store.ports) == [9443]
    store.apply([])
    assert store.ports == {}


def test_a_missing_certificate_file_is_named_in_the_error(tmp_path: Path) -> None:
    ca = CA(tmp_path / "pki")
    a = ca.issue("a", dns=("a.example.com",))
    a.cert.unlink()
    store = CertificateStore(_listeners(tmp_path, _server(8443, "a", "a.example.com", a)))
    [error] = store.errors()
    assert str(a.cert) in error
