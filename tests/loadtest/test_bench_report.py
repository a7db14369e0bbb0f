"""``loadtest/bench.py`` without load: which runs a scenario filter selects, and how the
report turns per-round figures into medians, ratios and pass/fail verdicts.

The figures are written by hand, so every expected ratio is known exactly; the
processes and load generators are exercised by ``make bench`` itself."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "loadtest"))

import bench  # loadtest/bench.py, a script


def _record(key: str, rnd: int, rps: float, **extra: float) -> dict:
    base = {"key": key, "round": rnd, "rps": rps, "errors": 0, "p50_ms": 1.0, "p99_ms": 2.0}
    base.update(cpu_ms_per_req=0.04, rss_mb=40.0, rss_worker_mb=40.0)
    return {**base, **extra}


def test_a_scenario_brings_the_runs_its_ratios_are_taken_to() -> None:
    scenarios, runs = bench.select(["edge", "h3"])
    assert [s.name for s in scenarios] == ["h3", "edge"]
    keys = [run.key for run in runs]
    # edge is compared with nginx's plain proxy, h3 with meshgate's own HTTP/2.
    assert set(keys) == {"edge/meshgate", "plain/nginx", "h3/meshgate", "h2tls/meshgate"}


def test_default_selection_is_every_default_scenario() -> None:
    scenarios, runs = bench.select([])
    names = [s.name for s in scenarios]
    assert "jwt-cold" not in names
    assert {"plain", "https", "h2tls", "h3", "edge", "routes", "workers2"} <= set(names)
    assert len({run.key for run in runs}) == len(runs)


def test_unknown_scenario_names_the_known_ones() -> None:
    with pytest.raises(SystemExit, match=r"unknown scenario.*plainn.*known: plain"):
        bench.select(["plainn"])


def test_ratios_are_taken_within_each_round_then_the_median() -> None:
    records = [
        _record("plain/nginx", 1, 1000),
        _record("plain/meshgate", 1, 600),  # 0.6
        _record("plain/nginx", 2, 2000),
        _record("plain/meshgate", 2, 800),  # 0.4
        _record("plain/nginx", 3, 1000),
        _record("plain/meshgate", 3, 550),  # 0.55
    ]
    results = bench.Results(records)
    assert results.ratio("plain/meshgate", "plain/nginx") == pytest.approx(0.55)
    # The ratio of the medians would be 600 / 1000 = 0.6: not what is reported.
    assert results.median("plain/meshgate", "rps") == 600


def test_http3_is_also_compared_per_gateway_cpu_second() -> None:
    # The Python HTTP/3 client can be what limits the rps; the gateway's CPU per
    # request says what it could serve with its core saturated.
    _scenarios, runs = bench.select(["h3"])
    records = [
        _record("h2tls/meshgate", 1, 8000, cpu_ms_per_req=0.12),
        _record("h3/meshgate", 1, 1200, cpu_ms_per_req=0.40),  # 0.15x rps, 0.30x per CPU
        _record("h2tls/meshgate", 2, 9000, cpu_ms_per_req=0.10),
        _record("h3/meshgate", 2, 1800, cpu_ms_per_req=0.20),  # 0.20x rps, 0.50x per CPU
        _record("h2tls/meshgate", 3, 8000, cpu_ms_per_req=0.15),
        _record("h3/meshgate", 3, 1600, cpu_ms_per_req=0.25),  # 0.20x rps, 0.60x per CPU
    ]
    results = bench.Results(records)
    assert results.cpu_ratio("h3/meshgate", "h2tls/meshgate") == pytest.approx(0.5)
    lines = bench.targets_table(results, runs, None)
    by_name = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("|")}
    assert "0.20x | ≥ 0.5 | **FAIL**" in by_name["HTTP/3 vs meshgate's HTTP/2"]
    per_cpu = by_name["HTTP/3 vs meshgate's HTTP/2, requests per gateway CPU second"]
    assert "0.50x | ≥ 0.5 | pass" in per_cpu


def test_targets_table_gives_pass_fail_and_flags_runs_with_errors() -> None:
    _scenarios, runs = bench.select(["plain", "latency"])
    records = [
        _record("plain/nginx", 1, 1000),
        _record("plain/meshgate", 1, 400, cpu_ms_per_req=0.03, rss_worker_mb=70.0),
        _record("latency/direct", 1, 9000, p50_ms=0.05),
        _record("latency/nginx", 1, 5000, p50_ms=0.10),
        _record("latency/meshgate", 1, 3000, p50_ms=0.15, errors=2),
    ]
    lines = bench.targets_table(bench.Results(records), runs, None)
    by_name = {line.split(" | ")[0].lstrip("| "): line for line in lines if line.startswith("|")}
    assert "0.40x | ≥ 0.5 | **FAIL**" in by_name["plain HTTP/1.1 vs nginx"]
    assert "0.0300 ms | ≤ 0.05 ms | pass |" in by_name["gateway CPU per plain request"]
    latency = by_name["added latency at 1 connection, p50 over the direct path"]
    assert "0.100 ms | ≤ 0.15 ms | pass (not valid: 2 errors)" in latency
    rss = next(line for name, line in by_name.items() if name.startswith("RSS per worker"))
    assert "70.0 MB | ≤ 60 MB | **FAIL**" in rss


def test_table_marks_nginx_not_applicable_and_names_the_reference() -> None:
    scenarios, runs = bench.select(["edge"])
    records = [_record("plain/nginx", 1, 1000), _record("edge/meshgate", 1, 300)]
    lines = bench.table(bench.Results(records), scenarios, runs)
    edge = [line for line in lines if line.startswith("| edge |")]
    assert "n/a" in edge[0] and "nginx" in edge[0]
    assert "| 0.30 | nginx plain |" in edge[1]


def test_rss_is_the_peak_while_the_load_runs_not_what_is_left_after() -> None:
    # A child that holds 64 MB, then lets it go: the figure is the peak.
    import subprocess

    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "held = bytearray(64 * 1024 * 1024)\n"
            "print('ready', flush=True)\n"
            "sys.stdin.readline()\n"
            "del held\n"
            "print('freed', flush=True)\n"
            "sys.stdin.readline()\n",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert child.stdout.readline().strip() == "ready"
        with bench._PeakRss(child.pid) as peak:
            child.stdin.write("\n")
            child.stdin.flush()
            assert child.stdout.readline().strip() == "freed"
        after_kb = bench.rss_kb(child.pid)
        assert peak.worker_kb >= 64 * 1024
        assert peak.tree_kb >= peak.worker_kb
        assert after_kb < 40 * 1024 < peak.worker_kb
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
