"""``meshgate routes`` end to end: a real process on real YAML files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "routing"


def _routes(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "routes", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_routes_prints_one_row_per_route_match() -> None:
    result = _routes(str(GOLDEN / "bookinfo.in.yaml"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "VHOST", "NAME", "DOMAINS", "MATCH", "VIRTUAL", "SERVICE"]
    rows = [line.split() for line in lines[1:]]
    assert [row[3] for row in rows] == [
        "/productpage",
        "/static*",
        "/login",
        "/logout",
        "/api/v1/products*",
    ]
    assert {(row[0], row[1], row[2], row[4]) for row in rows} == {
        ("http.8080", "*:8080", "*", "bookinfo.default")
    }


def test_routes_host_filter_shows_the_virtual_host_serving_it() -> None:
    path = str(GOLDEN / "merge-and-wildcards.in.yaml")
    shop = _routes(path, "--host", "shop.example.com:8080")
    assert shop.returncode == 0, shop.stderr
    assert [line.split()[1] for line in shop.stdout.splitlines()[1:]] == [
        "shop.example.com:8080"
    ] * 3
    other = _routes(path, "--host", "blog.example.com")
    assert [line.split()[1] for line in other.stdout.splitlines()[1:]] == ["*.example.com:8080"]


def test_routes_json_is_the_snapshot_dump_limited_to_the_host() -> None:
    path = str(GOLDEN / "subsets-and-policies.in.yaml")
    result = _routes(path, "--json", "--host", "reviews.example.com")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["version"]) == 16
    (listener,) = data["listeners"]
    assert [v["name"] for v in listener["virtualHosts"]] == ["reviews.example.com:8080"]
    assert [c["name"] for c in data["clusters"]] == [
        "outbound|9080|v1|reviews.internal",
        "outbound|9080|v2|reviews.internal",
        "outbound|9080|v3|reviews.internal",
    ]
    nothing = json.loads(_routes(path, "--json", "--host", "nope.example.com").stdout)
    assert nothing["listeners"] == [] and nothing["clusters"] == []


def test_routes_reports_configuration_errors_with_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n"
        "metadata: {name: x}\nspec: {hosts: [a.com], http: [{route: 5}]}\n",
        encoding="utf-8",
    )
    result = _routes(str(bad))
    assert result.returncode == 1
    assert "bad.yaml" in result.stderr
