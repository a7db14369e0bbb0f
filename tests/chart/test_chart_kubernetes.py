"""Every built-in Kubernetes object the chart renders, checked with
``kubernetes-validate --strict`` (the schemas ship inside the package: no cluster,
no network) against the oldest Kubernetes the chart supports and the newest."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import CHART, CI_VALUES, Render, find

VALIDATE = Path(sys.executable).with_name("kubernetes-validate")
# Chart.yaml's kubeVersion floor, and the newest schemas kubernetes-validate ships.
VERSIONS = ("1.25.0", None)


def kubernetes_validate(files: list[Path], version: str | None) -> subprocess.CompletedProcess:
    args = [str(VALIDATE), "--strict", "--quiet"]
    if version:
        args += ["--kubernetes-version", version]
    return subprocess.run(
        [*args, *map(str, files)], capture_output=True, text=True, timeout=120, check=False
    )


def write(docs: list[dict[str, Any]], path: Path) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def test_kube_version_floor_matches_what_is_validated() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={VERSIONS[0]}-0"


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v or "latest")
def test_every_rendered_object_passes_strict_kubernetes_validation(
    render: Render, tmp_path: Path, version: str | None
) -> None:
    files = []
    for index, values in enumerate([None, *CI_VALUES]):
        extra = ["istioCRDs.enabled=true"] if index == 0 else []
        docs = render(*([values] if values else []), set=extra)
        files.append(write(docs, tmp_path / f"{index}.yaml"))
    done = kubernetes_validate(files, version)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ERROR" not in done.stdout + done.stderr


def test_strict_validation_catches_a_misspelled_field(render: Render, tmp_path: Path) -> None:
    # The check above is only worth something if it can fail on the chart's own output.
    docs = [d for d in render() if d["kind"] == "Deployment"]
    deployment = find(docs, "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    done = kubernetes_validate([write(docs, tmp_path / "broken.yaml")], None)
    assert done.returncode != 0
    assert "readinesProbe" in done.stdout + done.stderr
