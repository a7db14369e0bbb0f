"""The configurations ``bench.py`` runs meshgate with, one per kind of gateway.

Every one routes to the same nginx backend through a ServiceEntry; they differ in
what the request meets on the way:

    plain       a Gateway (HTTP), the ServiceEntry, one catch-all VirtualService
    tls         the same behind an HTTPS server (HTTP/1.1 and HTTP/2 by ALPN,
                HTTP/3 on the same port over UDP)
    edge        plain + RequestAuthentication (RS256, inline JWKS) + an
                AuthorizationPolicy requiring a verified token + a rate limit on
                every request (local, or Redis with ``backend="redis"``)
    ratelimit   plain + the rate limit alone (local or Redis)
    vhosts      N VirtualServices, one host each (``svc{i}.bench.local``)

Limits are set far above what a benchmark sends, so every request is allowed and
pays for a whole decision. Access log and metrics stay on, as in production.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

ISSUER = "https://bench.meshgate.local"
AUDIENCE = "bench"
KID = "bench-rs"


def _base(port: int, backend_port: int, *, https: Path | None = None) -> str:
    if https is None:
        server = f"""    - port: {{number: {port}, name: http, protocol: HTTP}}
      hosts: ["*"]"""
    else:
        server = f"""    - port: {{number: {port}, name: https, protocol: HTTPS}}
      hosts: ["*"]
      tls: {{mode: SIMPLE, serverCertificate: {https}/tls.crt, privateKey: {https}/tls.key}}"""
    return f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
{server}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend}}
spec:
  hosts: [backend.bench.local]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}}}]
"""


def _catch_all() -> str:
    return """---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench}
spec:
  hosts: ["*"]
  gateways: [bench]
  http:
    - name: all
      route: [{destination: {host: backend.bench.local, port: {number: 80}}}]
"""


def _ratelimit(backend: str) -> str:
    return f"""---
apiVersion: meshgate.io/v1alpha1
kind: RateLimitPolicy
metadata: {{name: bench}}
spec:
  limits:
    - name: per-client
      key: ["remote.ip"]
      rate: {{requests: 1000000, per: second, burst: 1000000}}
      backend: {backend}
"""


def _security(jwks: str) -> str:
    return f"""---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: bench-jwt, namespace: istio-system}}
spec:
  jwtRules:
    - issuer: {ISSUER}
      audiences: [{AUDIENCE}]
      jwks: '{jwks}'
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: bench, namespace: istio-system}}
spec:
  action: ALLOW
  rules:
    - from: [{{source: {{requestPrincipals: ["{ISSUER}/*"]}}}}]
      to: [{{operation: {{methods: ["GET"], paths: ["/*"]}}}}]
"""


def write_config(
    config_dir: Path,
    kind: str,
    port: int,
    backend_port: int,
    *,
    certs: Path | None = None,
    jwks: str = "",
    limiter: str = "local",
    vhosts: int = 0,
) -> None:
    """Write ``bench.yaml`` for one gateway of ``kind`` into ``config_dir``."""
    config_dir.mkdir(parents=True)
    if kind == "tls":
        text = _base(port, backend_port, https=certs) + _catch_all()
    elif kind == "plain":
        text = _base(port, backend_port) + _catch_all()
    elif kind == "ratelimit":
        text = _base(port, backend_port) + _catch_all() + _ratelimit(limiter)
    elif kind == "edge":
        text = _base(port, backend_port) + _catch_all() + _security(jwks) + _ratelimit(limiter)
    elif kind == "vhosts":
        parts = [_base(port, backend_port)]
        for i in range(vhosts):
            # One host each, a prefix route of its own and a catch-all: the request
            # walks the host index and the first route, as most real traffic does.
            parts.append(
                f"""---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: vs{i}}}
spec:
  hosts: [svc{i}.bench.local]
  gateways: [bench]
  http:
    - name: api
      match: [{{uri: {{prefix: /api/{i}/}}}}]
      route: [{{destination: {{host: backend.bench.local, port: {{number: 80}}}}}}]
    - name: all
      route: [{{destination: {{host: backend.bench.local, port: {{number: 80}}}}}}]
"""
            )
        text = "".join(parts)
    else:
        raise ValueError(f"unknown gateway kind {kind!r}")
    (config_dir / "bench.yaml").write_text(text)


def mint_tokens(key_pem: bytes, count: int) -> list[str]:
    """``count`` distinct RS256 tokens for the bench issuer, valid for two hours."""
    import jwt
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    # Parsed once: loading a PEM RSA key checks it, which costs more than signing.
    key = load_pem_private_key(key_pem, password=None)
    now = int(time.time())
    out = []
    for n in range(count):
        claims: dict[str, Any] = {"iss": ISSUER, "sub": f"user-{n}", "aud": AUDIENCE}
        claims.update(iat=now, exp=now + 7200)
        out.append(jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID}))
    return out


def hosts_script(path: Path, count: int) -> Path:
    """A wrk Lua script sending each request to one of ``count`` hosts, in turn."""
    path.write_text(
        f"""-- Cycles the Host header over svc0..svc{count - 1}.bench.local.
local hosts = {{}}
for i = 0, {count - 1} do hosts[#hosts + 1] = "svc" .. i .. ".bench.local" end
local n = 0
request = function()
  n = n % #hosts + 1
  return wrk.format("GET", "/", {{["Host"] = hosts[n]}})
end
"""
    )
    return path


def tokens_script(path: Path, tokens_file: Path) -> Path:
    """A wrk Lua script cycling the tokens of ``tokens_file`` (one per line)."""
    path.write_text(
        f"""-- Every request carries the next token of the file, in turn.
local tokens = {{}}
for line in io.lines("{tokens_file}") do tokens[#tokens + 1] = line end
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "/", {{["Authorization"] = "Bearer " .. tokens[i]}})
end
"""
    )
    return path
