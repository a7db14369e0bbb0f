"""``meshgate egress`` and the egress flags of ``meshgate run``: what they turn on."""

from __future__ import annotations

from pathlib import Path

import pytest

from egress import ALLOW_ANY, REGISTRY_ONLY
from gateway.cli import _build_parser, _egress_mode


def _mode(*argv: str) -> tuple[dict[str, str], str, object]:
    return _egress_mode(_build_parser().parse_args(list(argv)))


def test_egress_command_serves_the_egress_gateway_registry_only() -> None:
    labels, workload, settings = _mode("egress", "config/", "--dns-server", "127.0.0.1:5353")
    assert labels == {"istio": "egressgateway"} and workload == "meshgate-egressgateway"
    assert settings.outbound_traffic_policy == REGISTRY_ONLY  # type: ignore[attr-defined]
    assert settings.dns_servers == ("127.0.0.1:5353",)  # type: ignore[attr-defined]


def test_run_stays_an_ingress_gateway() -> None:
    labels, workload, settings = _mode("run", "config/")
    assert labels == {"istio": "ingressgateway"} and workload == "meshgate-ingressgateway"
    assert settings is None


def test_run_with_egress_labels_or_a_policy_is_an_egress_gateway() -> None:
    dns = ("--dns-server", "127.0.0.1")
    assert _mode("run", "c/", "--labels", "istio=egressgateway", *dns)[2] is not None
    _, _, settings = _mode("run", "c/", "--outbound-traffic-policy", "ALLOW_ANY", *dns)
    assert settings.outbound_traffic_policy == ALLOW_ANY  # type: ignore[attr-defined]


def test_explicit_labels_and_workload_win_over_the_egress_defaults() -> None:
    labels, workload, _ = _mode(
        "egress",
        "c/",
        "--labels",
        "istio=egressgateway,app=out",
        "--workload-name",
        "exit",
        "--dns-server",
        "127.0.0.1",
    )
    assert labels == {"istio": "egressgateway", "app": "out"} and workload == "exit"


def test_a_dns_server_that_is_not_an_address_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        _mode("egress", "c/", "--dns-server", "dns.example.test")
    assert exited.value.code == 2
    assert "--dns-server" in capsys.readouterr().err


def test_a_hosts_file_named_but_missing_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    dns = ("--dns-server", "127.0.0.1")
    with pytest.raises(SystemExit) as exited:
        _mode("egress", "c/", *dns, "--hosts-file", str(tmp_path / "hosts"))
    assert exited.value.code == 2
    assert "--hosts-file" in capsys.readouterr().err
    (tmp_path / "hosts").write_text("10.0.0.1 pinned.test\n")
    _, _, settings = _mode("egress", "c/", *dns, "--hosts-file", str(tmp_path / "hosts"))
    assert settings.hosts_file == str(tmp_path / "hosts")  # type: ignore[attr-defined]
    _, _, settings = _mode("egress", "c/", *dns, "--hosts-file", "")
    assert settings.hosts_file == ""  # type: ignore[attr-defined]
