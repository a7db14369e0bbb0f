"""helm lint --strict over the chart's values sets, and values.schema.json refusing
what it must refuse, with messages an operator can act on."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import CHART, CI_VALUES, run_helm

HERE = Path(__file__).parent


def test_ci_values_cover_the_documented_scenarios() -> None:
    names = {p.name for p in CI_VALUES}
    assert names >= {
        "ingress-only-values.yaml",
        "ingress-egress-redis-values.yaml",
        "hpa-values.yaml",
        "existing-configmap-values.yaml",
        "tls-values.yaml",
    }


@pytest.mark.parametrize("values", [None, *CI_VALUES], ids=lambda p: p.name if p else "defaults")
def test_chart_lints_strictly(helm: str, values: Path | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values is not None:
        args += ["--values", str(values)]
    done = run_helm(helm, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout


def test_values_violating_the_schema_fail_lint_with_each_problem_named(helm: str) -> None:
    done = run_helm(
        helm, "lint", "--strict", str(CHART), "--values", str(HERE / "invalid-values.yaml")
    )
    assert done.returncode != 0
    report = done.stdout + done.stderr
    assert "values don't meet the specifications of the schema" in report
    for expected in (
        "Additional property replicas is not allowed",
        "replicaCount: Invalid type. Expected: integer, given: string",
        'service.type: service.type must be one of the following: "ClusterIP", "NodePort", '
        '"LoadBalancer"',
        'service.ports.0.protocol: service.ports.0.protocol must be one of the following: "TCP", '
        '"UDP"',
        "egress: Additional property replicaCont is not allowed",
        "autoscaling.enabled: Invalid type. Expected: boolean, given: string",
        "redisUrl: Does not match pattern",
    ):
        assert expected in report, f"{expected!r} missing from:\n{report}"


def test_template_refuses_schema_violations_too(helm: str) -> None:
    # install/upgrade go through the same check as template: a typo never reaches a cluster.
    done = run_helm(helm, "template", "x", str(CHART), "--set", "logFormat=xml")
    assert done.returncode != 0
    assert 'logFormat: logFormat must be one of the following: "json", "text"' in done.stderr
