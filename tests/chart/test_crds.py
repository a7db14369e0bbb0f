"""The chart's CRDs: generated from ``gateway/config/resources.py`` and committed,
structural as Kubernetes requires, in agreement with meshgate's own parser, and
accepting every resource in ``examples/``."""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from gateway.config.crd import CRD_FILES, crd_for, render_crd, strict_schema
from gateway.config.errors import ConfigErrors
from gateway.config.load import load_config
from gateway.config.resources import API_VERSIONS

from .conftest import CHART, REPO


@functools.cache
def chart_crds() -> dict[str, dict[str, Any]]:
    """Kind -> CRD, read from the chart's files (not from the generator)."""
    out = {}
    for relative in CRD_FILES.values():
        crd = yaml.safe_load((CHART / relative).read_text())
        out[crd["spec"]["names"]["kind"]] = crd
    return out


@functools.cache
def validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    group, version = api_version.split("/")
    crd = chart_crds()[kind]
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(strict_schema(served["schema"]["openAPIV3Schema"]))


@pytest.mark.parametrize("kind", sorted(CRD_FILES))
def test_committed_crd_is_the_generated_one(kind: str) -> None:
    path = CHART / CRD_FILES[kind]
    assert path.read_text() == render_crd(kind), (
        f"{path} is stale: run python -m gateway.config.crd and commit the result"
    )


def test_chart_holds_no_crd_the_generator_does_not_write() -> None:
    on_disk = {
        str(p.relative_to(CHART))
        for folder in ("crds", "files/istio-crds")
        for p in (CHART / folder).glob("*.yaml")
    }
    assert on_disk == set(CRD_FILES.values())
    assert set(CRD_FILES) == set(API_VERSIONS)


def _check_structural(node: dict[str, Any], path: str) -> list[str]:
    problems = []
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not preserve:
        problems.append(f"{path}: no type")
    if "properties" in node and "additionalProperties" in node:
        problems.append(f"{path}: properties and additionalProperties together")
    for name, child in node.get("properties", {}).items():
        problems += _check_structural(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += _check_structural(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        problems += _check_structural(node["items"], f"{path}[]")
    return problems


@pytest.mark.parametrize("kind", sorted(API_VERSIONS))
def test_crd_schema_is_structural_with_one_storage_version(kind: str) -> None:
    crd = crd_for(kind)
    versions = crd["spec"]["versions"]
    assert [v["name"] for v in versions] == [v.split("/")[1] for v in API_VERSIONS[kind][0]]
    assert sum(v["storage"] for v in versions) == 1
    for v in versions:
        assert _check_structural(v["schema"]["openAPIV3Schema"], v["name"]) == []


RATE_LIMIT = {
    "apiVersion": "meshgate.io/v1alpha1",
    "kind": "RateLimitPolicy",
    "metadata": {"name": "api", "namespace": "edge"},
    "spec": {
        "hosts": ["api.example.com"],
        "limits": [
            {
                "name": "per-user",
                "rate": {"requests": 10, "per": "second", "burst": 20},
                "key": ["request.auth.claims[sub]"],
                "backend": "redis",
                "failureMode": "closed",
            }
        ],
    },
}


def _broken(edit: str) -> dict[str, Any]:
    doc = copy.deepcopy(RATE_LIMIT)
    limit = doc["spec"]["limits"][0]
    if edit == "unknown field":
        limit["burstSize"] = 5
    elif edit == "quoted number":
        limit["rate"]["requests"] = "10"
    elif edit == "missing rate":
        del limit["rate"]
    elif edit == "unknown unit":
        limit["rate"]["per"] = "fortnight"
    elif edit == "unknown backend":
        limit["backend"] = "memcached"
    elif edit == "zero requests":
        limit["rate"]["requests"] = 0
    return doc


@pytest.mark.parametrize(
    "edit",
    [
        None,
        "unknown field",
        "quoted number",
        "missing rate",
        "unknown unit",
        "unknown backend",
        "zero requests",
    ],
)
def test_crd_and_meshgate_agree_on_a_rate_limit_policy(edit: str | None, tmp_path: Path) -> None:
    doc = _broken(edit) if edit else RATE_LIMIT
    schema_errors = list(validator(doc["apiVersion"], doc["kind"]).iter_errors(doc))
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(doc))
    try:
        load_config([str(tmp_path)])
        meshgate_ok = True
    except ConfigErrors:
        meshgate_ok = False
    assert meshgate_ok == (edit is None), f"meshgate {'accepted' if meshgate_ok else 'refused'}"
    assert (schema_errors == []) == (edit is None), [e.message for e in schema_errors]


def example_documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in sorted((REPO / "examples").rglob("*.y*ml")):
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if not isinstance(doc, dict) or doc.get("kind") not in API_VERSIONS:
                continue
            # The Gateway API has its own "Gateway", checked by the upstream CRDs.
            if str(doc.get("apiVersion", "")).startswith("gateway.networking.k8s.io/"):
                continue
            out.append((f"{path.relative_to(REPO)}#{index}", doc))
    return out


EXAMPLES = example_documents()


def test_examples_hold_custom_resources_to_check() -> None:
    assert len(EXAMPLES) >= 3


@pytest.mark.parametrize("where,doc", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_example_resource_matches_the_chart_crd(where: str, doc: dict[str, Any]) -> None:
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator(doc["apiVersion"], doc["kind"]).iter_errors(doc)
    ]
    assert errors == [], f"{where}: {errors}"


def test_crd_validation_refuses_a_misspelled_example_field() -> None:
    where, doc = EXAMPLES[0]
    broken = copy.deepcopy(doc)
    broken["spec"]["hostz"] = ["oops"]
    errors = list(validator(broken["apiVersion"], broken["kind"]).iter_errors(broken))
    assert any("hostz" in e.message for e in errors), where
