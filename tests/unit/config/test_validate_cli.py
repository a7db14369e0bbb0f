"""``meshgate validate`` as a user runs it: a real process, exact output, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MESHGATE = Path(sys.executable).parent / "meshgate"
GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "config"


def _validate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MESHGATE), "validate", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_valid_directory_exits_0_and_prints_the_count() -> None:
    result = _validate("bookinfo.in", cwd=GOLDEN)
    assert (result.returncode, result.stdout, result.stderr) == (
        0,
        "8 resources valid, 0 warnings\n",
        "",
    )


def test_warnings_are_printed_but_do_not_fail() -> None:
    result = _validate("warn-weights.in.yaml", cwd=GOLDEN)
    assert result.returncode == 0
    assert result.stdout == "3 resources valid, 2 warnings\n"
    assert result.stderr == (
        "warning: warn-weights.in.yaml:27: VirtualService default/split: spec.http[0].route: "
        "weights add up to 80, not 100; traffic is split in proportion to them\n"
        "warning: warn-weights.in.yaml:32: VirtualService default/split: spec.http[1].route: "
        "weights add up to 180, not 100; traffic is split in proportion to them\n"
    )


def test_errors_exit_1_with_every_error_and_a_summary(tmp_path: Path) -> None:
    (tmp_path / "routes.yaml").write_text(
        "apiVersion: networking.istio.io/v1\n"
        "kind: VirtualService\n"
        "metadata: {name: checkout, namespace: shop}\n"
        "spec:\n"
        "  hosts: [shop.example.test]\n"
        "  http:\n"
        "  - route:\n"
        "    - destination: {host: payments}\n"
        "      weight: 120\n"
        "    timeout: forever\n",
        encoding="utf-8",
    )
    result = _validate("routes.yaml", "missing.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == (
        "warning: routes.yaml:8: VirtualService shop/checkout: "
        "spec.http[0].route[0].destination.host: "
        'no ServiceEntry for host "payments.shop.svc.cluster.local"; requests routed here get 503\n'
        "error: missing.yaml: no such file or directory\n"
        "error: routes.yaml:9: VirtualService shop/checkout: spec.http[0].route[0].weight: "
        "weight 120 is outside 0..100\n"
        "error: routes.yaml:10: VirtualService shop/checkout: spec.http[0].timeout: "
        '"forever" is not a duration (examples: 1s, 100ms, 1.5s, 1m, 1h)\n'
        "3 errors in 1 resource; nothing was applied\n"
    )


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("kind: [Gateway\nmetadata: {}\n", encoding="utf-8")
    result = _validate("bad.yaml", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith("error: bad.yaml:2: YAML syntax error: ")


def test_validate_without_paths_is_a_usage_error() -> None:
    result = _validate(cwd=GOLDEN)
    assert result.returncode == 2
    assert "PATH" in result.stderr
