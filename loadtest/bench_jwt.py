#!/usr/bin/env python3
"""What JWT validation costs: requests/s through meshgate with and without it.

Setup (all on 127.0.0.1, pinned like ``bench.py``): one nginx backend (fixed 100-byte
response) and wrk on LOAD_CORE; one ``meshgate run`` per variant on PROXY_CORE, each
on its own port, only one of them under load at a time:

    off-rs256    the bench config, no security policy; requests carry the RS256 token
                 anyway, so both sides parse and forward the same bytes
    rs256        + a RequestAuthentication (RS256 key, inline JWKS); every request
                 carries the same valid token: after the first, a token-cache hit
    rs256-cold   RS256, every request a different token (12 000 tokens cycled, more
                 than the 10 000-entry cache holds): a full signature check each time
    off-es256, es256, es256-cold   the same with an ES256 key

ROUNDS interleaved rounds of DUR seconds per variant at 50 connections (wrk -t1 -c50,
a discarded warm-up first). Each variant's ratio is to the ``off`` variant of its
algorithm in the same round (the cold variants to ``off`` with the cycled tokens),
then the median across rounds. The markdown table is printed; with DOC=1 it is also appended
to docs/benchmarks.md. Environment: DUR (10), ROUNDS (3), ONLY (comma list of variants,
their baselines included), PROXY_CORE (0), LOAD_CORE (1).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench  # noqa: E402  (the shared harness: processes, ports, wrk parsing)

DOC = HERE.parent / "docs" / "benchmarks.md"
DUR = int(os.environ.get("DUR", "10"))
ROUNDS = int(os.environ.get("ROUNDS", "3"))
COLD_TOKENS = 12_000
ALL_VARIANTS = (
    "off-rs256",
    "rs256",
    "off-rs256-cold",
    "rs256-cold",
    "off-es256",
    "es256",
    "off-es256-cold",
    "es256-cold",
)
# ONLY=rs256,es256 measures those (and their baselines) alone.
_ONLY = [v for v in os.environ.get("ONLY", "").split(",") if v]
VARIANTS = tuple(
    v for v in ALL_VARIANTS if not _ONLY or v in _ONLY or (v.startswith("off-") and v[4:] in _ONLY)
)
ISSUER = "https://bench.meshgate.local"


def _keys() -> dict[str, tuple[Any, str]]:
    """Private key and public JWKS document per algorithm."""
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from jwt.algorithms import ECAlgorithm, RSAAlgorithm

    out = {}
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(RSAAlgorithm.to_jwk(rsa_key.public_key()))
    out["RS256"] = (rsa_key, json.dumps({"keys": [{**jwk, "kid": "rs", "alg": "RS256"}]}))
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(ECAlgorithm.to_jwk(ec_key.public_key()))
    out["ES256"] = (ec_key, json.dumps({"keys": [{**jwk, "kid": "es", "alg": "ES256"}]}))
    return out


def _token(key: Any, alg: str, n: int) -> str:
    import jwt

    now = int(time.time())
    claims = {"iss": ISSUER, "sub": f"user-{n}", "aud": "bench", "iat": now, "exp": now + 7200}
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": alg[:2].lower()})


def _security_yaml(jwks: str) -> str:
    return f"""apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: bench-jwt, namespace: istio-system}}
spec:
  jwtRules:
    - issuer: {ISSUER}
      audiences: [bench]
      jwks: '{jwks}'
"""


def _lua(tokens_file: Path) -> str:
    return f"""
local tokens = {{}}
for line in io.lines("{tokens_file}") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/", {{["Authorization"] = "Bearer " .. tokens[i]}})
end
"""


def _wrk(port: int, duration_s: int, header: str | None, script: Path | None) -> dict[str, Any]:
    argv = ["taskset", "-c", bench.LOAD_CORE, "timeout", str(duration_s + 30), "wrk", "-t1"]
    argv += ["-c50", f"-d{duration_s}s"]
    if header:
        argv += ["-H", header]
    if script:
        argv += ["-s", str(script)]
    argv.append(f"http://127.0.0.1:{port}/")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration_s + 60).stdout
    rps = next((float(line.split()[1]) for line in out.splitlines() if "Requests/sec" in line), 0)
    non2xx = next((int(line.split()[-1]) for line in out.splitlines() if "Non-2xx" in line), 0)
    requests = next(
        (int(line.split()[0]) for line in out.splitlines() if " requests in " in line), 0
    )
    return {"rps": rps, "non2xx": non2xx, "requests": requests}


def main() -> int:
    scratch = Path(tempfile.mkdtemp(prefix="meshgate-bench-jwt-"))
    procs = bench.Processes(scratch)
    try:
        keys = _keys()
        # One token per algorithm for the hot variants, shared with their baseline.
        tokens_hot = {alg: _token(key, alg, 0) for alg, (key, _) in keys.items()}
        backend_port = bench.free_port()
        values = {"DIR": str(scratch), "BACKEND_PORT": str(backend_port), "PROXY_PORT": "0"}
        backend = procs.start(
            "backend", bench._nginx_argv(scratch, "backend", values), bench.LOAD_CORE
        )
        bench.wait_http_ok(backend_port, backend, "backend")
        ports: dict[str, int] = {}
        headers: dict[str, str | None] = {}
        scripts: dict[str, Path | None] = {}
        for variant in VARIANTS:
            port = bench.free_port()
            ports[variant] = port
            config = scratch / f"config-{variant}"
            bench.write_meshgate_config(config, port, backend_port)
            headers[variant] = None
            scripts[variant] = None
            alg = "RS256" if "rs256" in variant else "ES256"
            key, jwks = keys[alg]
            if not variant.startswith("off"):
                (config / "security.yaml").write_text(_security_yaml(jwks))
            if variant.endswith("-cold"):
                tokens = scratch / f"tokens-{alg}.txt"
                if not tokens.exists():
                    tokens.write_text(
                        "\n".join(_token(key, alg, n) for n in range(COLD_TOKENS)) + "\n"
                    )
                script = scratch / f"{variant}.lua"
                script.write_text(_lua(tokens))
                scripts[variant] = script
            else:
                headers[variant] = f"Authorization: Bearer {tokens_hot[alg]}"
            argv = [sys.executable, "-m", "gateway.cli", "run", str(config)]
            argv += ["--workers", "1", "--admin-port", str(bench.free_port())]
            proc = procs.start(variant, argv, bench.PROXY_CORE, stdout=subprocess.DEVNULL)
            bench.wait_http_ok(port, proc, variant)  # no token: still allowed (no authz)
        results: dict[str, list[float]] = {v: [] for v in VARIANTS}
        ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
        cpu_us: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for round_no in range(ROUNDS):
            row = {}
            for variant in VARIANTS:
                _wrk(ports[variant], 2, headers[variant], scripts[variant])  # warm-up
                # CPU time of the gateway process per request: unlike requests/s it
                # barely moves when other work shares the machine.
                result = bench.measure(
                    procs.pid(variant),
                    lambda v=variant: _wrk(ports[v], DUR, headers[v], scripts[v]),
                )
                cpu_us[variant].append((result["cpu_ms_per_req"] or 0.0) * 1000.0)
                if result["non2xx"]:
                    raise SystemExit(f"{variant}: {result['non2xx']} non-2xx responses")
                row[variant] = result["rps"]
                results[variant].append(result["rps"])
            for variant in VARIANTS:
                base = row[_baseline(variant)]
                ratios[variant].append(row[variant] / base if base else 0.0)
            print(f"round {round_no + 1}: " + json.dumps(row), file=sys.stderr, flush=True)
        report = _report(results, ratios, cpu_us)
        print(report)
        if os.environ.get("DOC") == "1":
            with DOC.open("a", encoding="utf-8") as f:
                f.write("\n" + report)
        return 0
    finally:
        procs.stop_all()


def _baseline(variant: str) -> str:
    return variant if variant.startswith("off") else f"off-{variant}"


def _report(
    results: dict[str, list[float]],
    ratios: dict[str, list[float]],
    cpu_us: dict[str, list[float]],
) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    lines = [
        f"### JWT validation cost ({time.strftime('%Y-%m-%d')}, commit {commit})",
        "",
        f"`python loadtest/bench_jwt.py` with DUR={DUR} ROUNDS={ROUNDS}: wrk -t1 -c50 on core "
        f"{bench.LOAD_CORE} with the nginx backend, each meshgate (1 worker) on core "
        f"{bench.PROXY_CORE}; {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; 1-minute load average before the run "
        f"{os.getloadavg()[0]:.2f}. Absolute figures move with whatever else runs on the "
        "machine; the ratios come from the same rounds.",
        "",
        "| variant | requests/s | ratio to no JWT | gateway CPU µs/request | "
        "CPU ratio (no JWT / this) |",
        "|---|---:|---:|---:|---:|",
    ]
    for variant in VARIANTS:
        cpu = statistics.median(cpu_us[variant])
        base_cpu = statistics.median(cpu_us[_baseline(variant)])
        lines.append(
            f"| {variant} | {statistics.median(results[variant]):,.0f} | "
            f"{statistics.median(ratios[variant]):.3f} | {cpu:.1f} | "
            f"{(base_cpu / cpu if cpu else 0.0):.3f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
