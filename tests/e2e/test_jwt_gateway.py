"""examples/public-api through a real ``meshgate run``: JWT authentication with a
local JWKS endpoint, AuthorizationPolicy, claim routing, and every token attack.

Tokens are minted with jwcrypto from the example's own development key (and from
test keys), so the gateway's pyjwt-based verification is checked by another
implementation. The upstreams count what they receive: a refused request must never
reach them.
"""

from __future__ import annotations

import base64
import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from jwcrypto import jwk
from jwt_fixtures import JwksServer, hs256_with_public_key, jwks_json, mint, rsa_key, unsigned
from test_gateway_helpers import Gateway, free_ports, raw_exchange

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "public-api"
ISSUER = "https://dev.meshgate.local"
AUDIENCE = "public-api"


class Upstream:
    """An HTTP upstream that records every request it receives."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                record = {
                    "path": self.path,
                    "method": self.command,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "upstream": owner.name,
                }
                with owner.lock:
                    owner.seen.append(record)
                body = json.dumps(record).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()

    def count(self) -> int:
        with self.lock:
            return len(self.seen)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Env:
    def __init__(self, tmp: Path, *, jwks_down: bool = False, security: bool = True) -> None:
        self.example_key = jwk.JWK.from_pem((EXAMPLE / "dev-only" / "dev-key.pem").read_bytes())
        self.example_key["kid"] = "dev-1"  # jwcrypto keeps kid in the dict
        self.rotated = rsa_key("rotated")
        self.jwks = JwksServer(document=(EXAMPLE / "jwks" / "jwks.json").read_text())
        self.jwks.down = jwks_down
        self.jwks.start()
        self.stable = Upstream("stable")
        self.beta = Upstream("beta")
        gw_port, admin_port = free_ports(2)
        self.port = gw_port
        self.admin_port = admin_port
        config = tmp / "config"
        config.mkdir()
        self.config = config
        for name in ("gateway.yaml", "security.yaml"):
            text = (EXAMPLE / name).read_text()
            text = (
                text.replace("number: 8080", f"number: {gw_port}")
                .replace("http: 9181", f"http: {self.stable.port}")
                .replace("http: 9182", f"http: {self.beta.port}")
                .replace("127.0.0.1:9199", f"127.0.0.1:{self.jwks.port}")
            )
            if name == "security.yaml" and not security:
                self.pending_security = text  # written later by a reload test
                continue
            (config / name).write_text(text)
        self.gateway = Gateway(config, admin_port, "--jwks-kid-cooldown-s", "2")
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{gw_port}", timeout=10)

    def token(self, key: jwk.JWK | None = None, alg: str = "ES256", **overrides: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": ISSUER,
            "sub": "alice",
            "aud": AUDIENCE,
            "iat": now,
            "exp": now + 600,
            "scope": "read",
        }
        payload.update(overrides)
        payload = {k: v for k, v in payload.items() if v is not None}
        return mint(key or self.example_key, payload, alg=alg)

    def get(self, path: str, token: str | None = None, method: str = "GET") -> httpx.Response:
        headers = {"x-request-id": uuid.uuid4().hex}
        if token is not None:
            headers["authorization"] = f"Bearer {token}"
        return self.client.request(method, path, headers=headers)

    def upstream_count(self) -> int:
        return self.stable.count() + self.beta.count()

    def close(self) -> None:
        self.client.close()
        self.gateway.stop()
        self.stable.stop()
        self.beta.stop()
        self.jwks.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    environment = Env(tmp_path_factory.mktemp("public-api"))
    yield environment
    environment.close()


# --------------------------------------------------------------------------- 200 / 403


def test_public_path_needs_no_token(env: Env) -> None:
    response = env.get("/public/hello")
    assert response.status_code == 200
    assert response.json()["upstream"] == "stable"


def test_api_without_token_is_denied_403_and_never_forwarded(env: Env) -> None:
    before = env.upstream_count()
    response = env.get("/api/items")
    assert response.status_code == 403
    assert response.text == "RBAC: access denied"
    assert env.upstream_count() == before
    record = env.gateway.log_for(response.request.headers["x-request-id"])
    assert "RBAC" in record["response_flags"]
    assert record["authz"] == "deny:no-allow-match"


def test_valid_token_reads_and_the_token_is_stripped(env: Env) -> None:
    response = env.get("/api/items", env.token())
    assert response.status_code == 200
    seen = response.json()["headers"]
    assert "authorization" not in seen
    assert seen["x-api-user"] == "alice"
    record = env.gateway.log_for(response.request.headers["x-request-id"])
    assert record["authz"] == "allow:istio-system/public-api"


def test_client_cannot_spoof_a_claim_header(env: Env) -> None:
    response = env.client.get(
        "/public/x", headers={"x-api-user": "root", "x-request-id": uuid.uuid4().hex}
    )
    assert response.status_code == 200
    assert "x-api-user" not in response.json()["headers"]


def test_write_needs_the_write_scope(env: Env) -> None:
    before = env.upstream_count()
    assert env.get("/api/items", env.token(scope="read"), method="POST").status_code == 403
    assert env.upstream_count() == before
    ok = env.get("/api/items", env.token(scope="read write"), method="POST")
    assert ok.status_code == 200


def test_dot_segments_cannot_walk_around_the_policy(env: Env) -> None:
    before = env.upstream_count()
    # Raw bytes: an HTTP client library would normalise the path before sending it.
    answer = raw_exchange(
        env.port, b"GET /public/../api/items HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 403"), answer[:100]
    assert env.upstream_count() == before


# --------------------------------------------------------------------------- claim routing


def test_claim_routes_beta_testers_to_the_beta_track(env: Env) -> None:
    assert env.get("/api/items", env.token(group="beta")).json()["upstream"] == "beta"
    assert env.get("/api/items", env.token(group="stable")).json()["upstream"] == "stable"
    assert env.get("/api/items", env.token()).json()["upstream"] == "stable"


def test_claims_of_an_invalid_token_never_route(env: Env) -> None:
    forged = env.token(key=rsa_key("dev-1"), alg="RS256", group="beta")
    before = env.beta.count()
    assert env.get("/api/items", forged).status_code == 401
    assert env.beta.count() == before


# --------------------------------------------------------------------------- attacks


def _tampered(token: str) -> str:
    head, payload, sig = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(payload + "=="))
    data["sub"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{head}.{forged}.{sig}"


def _attack_tokens(env: Env) -> dict[str, str]:
    now = int(time.time())
    rsa = rsa_key("dev-1")
    return {
        "alg-none": unsigned({"iss": ISSUER, "sub": "alice", "aud": AUDIENCE}),
        "hs256-with-public-key": hs256_with_public_key(rsa, {"iss": ISSUER, "aud": AUDIENCE}),
        "expired": env.token(iat=now - 7200, exp=now - 3600),
        "not-yet-valid": env.token(nbf=now + 3600),
        "wrong-issuer": env.token(iss="https://evil.example.com"),
        "wrong-audience": env.token(aud="another-api"),
        "unknown-kid": mint(rsa_key("nobody"), {"iss": ISSUER, "aud": AUDIENCE}, alg="RS256"),
        "tampered-payload": _tampered(env.token()),
        "oversized": env.token(padding="x" * 9000),
        "malformed-base64": "eyJhbGciOiJFUzI1NiJ9.***not-base64***.c2ln",
    }


ATTACKS = [
    "alg-none",
    "hs256-with-public-key",
    "expired",
    "not-yet-valid",
    "wrong-issuer",
    "wrong-audience",
    "unknown-kid",
    "tampered-payload",
    "oversized",
    "malformed-base64",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_attack_is_rejected_401_and_never_reaches_the_upstream(env: Env, attack: str) -> None:
    token = _attack_tokens(env)[attack]
    before = env.upstream_count()
    response = env.get("/public/anything", token)  # even a public path: a bad token is 401
    assert response.status_code == 401, (attack, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer realm=")
    assert 'error="invalid_token"' in response.headers["www-authenticate"]
    assert env.upstream_count() == before
    record = env.gateway.log_for(response.request.headers["x-request-id"])
    assert record["status"] == 401 and "JWT" in record["response_flags"]


def test_token_in_query_param_is_ignored_when_only_headers_are_configured(env: Env) -> None:
    # Istio semantics: a token where no rule looks is no token at all, so the
    # request is anonymous and the ALLOW policy refuses it (403, not 401).
    before = env.upstream_count()
    response = env.client.get(
        f"/api/items?access_token={env.token()}", headers={"x-request-id": uuid.uuid4().hex}
    )
    assert response.status_code == 403
    assert env.upstream_count() == before


# --------------------------------------------------------------------------- JWKS life


def test_rotation_new_key_is_fetched_on_first_use_and_old_key_stops_working(
    tmp_path: Path,
) -> None:
    # A gateway of its own: no earlier unknown kid has started the refetch cool-down.
    fresh = Env(tmp_path)
    try:
        old_token = fresh.token()
        assert fresh.get("/api/items", old_token).status_code == 200
        fresh.jwks.set(jwks_json(fresh.rotated))  # rotation: new key in, the old one gone
        fetches = fresh.jwks.count()
        new_token = fresh.token(key=fresh.rotated, alg="RS256")
        assert fresh.get("/api/items", new_token).status_code == 200
        assert fresh.jwks.count() == fetches + 1  # one refetch for the unknown kid
        # The old token was cached as valid; the key set changed, so it is re-checked.
        assert fresh.get("/api/items", old_token).status_code == 401
    finally:
        fresh.close()


def test_unknown_kid_storm_fetches_jwks_a_bounded_number_of_times(env: Env) -> None:
    stranger = rsa_key("stranger")
    before = env.jwks.count()
    started = time.monotonic()
    for i in range(100):
        token = mint(stranger, {"iss": ISSUER, "aud": AUDIENCE}, alg="RS256", kid=f"junk-{i}")
        assert env.get("/public/x", token).status_code == 401
    elapsed = time.monotonic() - started
    # At most one refetch per 2-second cool-down (plus the background refresh).
    assert env.jwks.count() - before <= int(elapsed / 2) + 2


def test_jwks_down_at_start_gives_401_then_recovers(tmp_path: Path) -> None:
    down = Env(tmp_path, jwks_down=True)
    try:
        token = down.token()
        before = down.upstream_count()
        assert down.get("/api/items", token).status_code == 401
        assert down.upstream_count() == before
        down.jwks.set(down=False)
        deadline = time.monotonic() + 15
        while down.get("/api/items", token).status_code != 200:
            assert time.monotonic() < deadline, "gateway never fetched the keys"
            down.jwks.fetched.clear()
            down.jwks.fetched.wait(1.0)
        # The endpoint goes away again: the last good keys keep serving.
        down.jwks.set(down=True)
        assert down.get("/api/items", down.token(sub="bob")).status_code == 200
    finally:
        down.close()


def test_policies_added_by_a_reload_apply_at_once(tmp_path: Path) -> None:
    import signal

    env = Env(tmp_path, security=False)
    try:
        assert env.get("/api/items").status_code == 200  # nothing bound yet
        (env.config / "security.yaml").write_text(env.pending_security)
        env.gateway.proc.send_signal(signal.SIGHUP)
        env.gateway.wait_stderr(lambda line: "applied version" in line)
        assert env.get("/api/items").status_code == 403
        assert env.get("/api/items", env.token()).status_code == 200
        assert env.get("/api/items", env.token(aud="other")).status_code == 401
    finally:
        env.close()


def test_example_readme_token_command_mints_a_usable_token(env: Env) -> None:
    import subprocess
    import sys

    meshgate = str(Path(sys.executable).with_name("meshgate"))
    result = subprocess.run(
        [
            meshgate, "token", "--key", str(EXAMPLE / "dev-only" / "dev-key.pem"),
            "--kid", "dev-1", "--issuer", ISSUER, "--aud", AUDIENCE, "--scope", "read write",
        ],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "DEVELOPMENT ONLY" in result.stderr
    response = env.get("/api/items", result.stdout.strip(), method="DELETE")
    assert response.status_code == 200


def test_config_dump_and_metrics_show_jwks_health_and_decisions(env: Env) -> None:
    assert env.get("/api/items", env.token()).status_code == 200
    assert env.get("/api/items").status_code == 403
    admin = f"http://127.0.0.1:{env.admin_port}"
    dump = httpx.get(f"{admin}/config_dump", timeout=10).json()
    (security,) = dump["security"]
    (jwks,) = security["jwks"]
    assert jwks["uri"] == env.jwks.url
    assert jwks["keys"] >= 1 and jwks["lastSuccess"] is not None
    assert dump["snapshot"]["security"]["authorization"]["ALLOW"] == ["istio-system/public-api"]
    metrics = httpx.get(f"{admin}/metrics", timeout=10).text
    assert 'meshgate_jwt_requests_total{result="accepted",reason=""}' in metrics
    assert 'meshgate_authz_decisions_total{decision="deny",action="ALLOW",policy="-"}' in metrics
    assert f'meshgate_jwks_keys{{uri="{env.jwks.url}"}}' in metrics


def test_examples_dir_has_no_stray_files() -> None:
    # The example is copied by this test; keep it to what the README describes.
    names = sorted(p.name for p in EXAMPLE.iterdir())
    assert names == ["README.md", "dev-only", "gateway.yaml", "jwks", "security.yaml"]
    assert shutil.which("python3") is not None  # the README serves jwks/ with it
