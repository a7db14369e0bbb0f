"""The load scenarios of ``make loadtest``: users of a JWT-protected public API.

``loadtest/run_loadtest.py`` starts the gateway (``loadtest/config/``), its backends
and Redis, then runs locust headless on this file. The scenarios:

==================  =========================================================  ======
user                what it does                                               count
==================  =========================================================  ======
AnonymousBrowser    reads public pages and /healthz without a token; now and   weight
                    then tries the API and must be refused with 403            3
SignedInUser        a token minted for this simulated user, from one of two    weight
                    issuers (RS256 and ES256), scope "read" or "read write";   3
                    reads the API, writes when its scope allows, else must
                    get 403
WriteHeavyClient    posts orders faster than its RateLimitPolicy allows; the   2
                    share of 429s must match the configured rate
CanaryShopper       browses the catalogue, whose route splits traffic between  2
                    two tracks; the observed split must match the weights
Http2Client         signed-in reads over HTTPS with HTTP/2 (httpx with h2,     2
                    inside a locust User: locust's own clients speak HTTP/1.1)
==================  =========================================================  ======

Thresholds are in ``THRESHOLDS`` below. When the run ends, every check is printed,
written as JSON to ``$LOADTEST_CHECKS`` and decides the exit code (0: all passed).
The rate limit and the weights are read from the configuration the gateway runs
with (``$LOADTEST_CONFIG_DIR``), so the checks follow the YAML.

The write-heavy and canary checks count inside this process: run locust as one
process (``run_loadtest.py`` does), not distributed.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import jwt
import yaml
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from locust import FastHttpUser, User, between, constant_throughput, events, task
from locust.env import Environment

# --------------------------------------------------------------------------- thresholds

THRESHOLDS: dict[str, float] = {
    # Failed requests (a status the scenario did not expect, a connection error) over
    # all requests.
    "max_error_rate": 0.01,
    # 95th percentile of every request's latency, in ms (skipped with
    # LOADTEST_CHECK_LATENCY=0: a quick run on a busy machine says nothing about it).
    "max_p95_ms": 300.0,
    # Requests the rate limit let through, against what the configured rate admits
    # over the time the writers were sending (burst + rate x time): relative error.
    "ratelimit_tolerance": 0.10,
    # Observed canary share against the VirtualService weights, in share points;
    # widened to 4 standard deviations of a binomial share when the sample is small.
    "canary_tolerance": 0.05,
}

WRITER_RPS = 40.0  # per WriteHeavyClient: well above the limit, so it must hit it
CANARY_RPS = 20.0  # per CanaryShopper: enough samples for the share check

CONFIG_DIR = Path(os.environ.get("LOADTEST_CONFIG_DIR", Path(__file__).parent / "config"))
KEYS_DIR = Path(os.environ.get("LOADTEST_KEYS_DIR", "."))
HTTPS_URL = os.environ.get("LOADTEST_HTTPS_URL", "")
CA_FILE = os.environ.get("LOADTEST_CA_FILE") or None
CHECKS_FILE = os.environ.get("LOADTEST_CHECKS", "")
CHECK_LATENCY = os.environ.get("LOADTEST_CHECK_LATENCY", "1") != "0"

AUDIENCE = "public-api"
ISSUERS = (
    # issuer, algorithm, key file (written by run_loadtest.py), kid
    ("https://accounts.loadtest.local", "RS256", "accounts.pem", "accounts-1"),
    ("https://partners.loadtest.local", "ES256", "partners.pem", "partners-1"),
)
SCOPES = ("read", "read write")

_user_numbers = itertools.count(1)
_keys: dict[str, Any] = {}


def mint_token(issuer_index: int, sub: str, scope: str) -> str:
    """A token for one simulated user, signed with that issuer's key."""
    issuer, alg, key_file, kid = ISSUERS[issuer_index % len(ISSUERS)]
    key = _keys.get(key_file)
    if key is None:
        # Parsed once per issuer: loading a PEM key checks it, which costs more than
        # signing with it.
        pem = (KEYS_DIR / key_file).read_bytes()
        key = _keys[key_file] = load_pem_private_key(pem, password=None)
    now = int(time.time())
    claims = {"iss": issuer, "sub": sub, "aud": AUDIENCE, "iat": now, "exp": now + 3600}
    claims["scope"] = scope
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": kid})


# --------------------------------------------------------------------------- configuration


def _documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    return docs


def configured_limit(route: str = "orders") -> tuple[float, int]:
    """(requests per second, burst) of the first limit on ``route``."""
    per_s = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
    for doc in _documents():
        if doc.get("kind") != "RateLimitPolicy" or route not in doc["spec"].get("routes", []):
            continue
        rate = doc["spec"]["limits"][0]["rate"]
        requests = int(rate["requests"])
        return requests / per_s[rate.get("per", "second")], int(rate.get("burst", requests))
    raise LookupError(f"no RateLimitPolicy names the route {route!r} in {CONFIG_DIR}")


def configured_weights(route: str = "catalog") -> dict[str, float]:
    """Subset -> share of the weighted route ``route`` (weights normalised)."""
    for doc in _documents():
        if doc.get("kind") != "VirtualService":
            continue
        for rule in doc["spec"].get("http", []):
            if rule.get("name") == route:
                weights = {d["destination"]["subset"]: d.get("weight", 0) for d in rule["route"]}
                total = sum(weights.values()) or 1
                return {subset: weight / total for subset, weight in weights.items()}
    raise LookupError(f"no VirtualService route named {route!r} in {CONFIG_DIR}")


# --------------------------------------------------------------------------- observations


@dataclass
class WriterTally:
    """One write-heavy client's requests: when it sent, what came back."""

    first_s: float | None = None
    last_s: float = 0.0
    allowed: int = 0
    limited: int = 0


@dataclass
class Observed:
    """What the scenarios saw beyond locust's own statistics."""

    writers: list[WriterTally] = field(default_factory=list)
    served_by: dict[str, int] = field(default_factory=dict)
    h2_responses: int = 0
    other_versions: int = 0
    anonymous_denied: int = 0
    read_only_denied: int = 0


OBSERVED = Observed()


def _expect(response: Any, *statuses: int) -> bool:
    """Mark a catch_response response failed unless its status is one of ``statuses``."""
    if response.status_code in statuses:
        response.success()
        return True
    body = (response.text or "")[:120] if response.status_code else str(response.error)
    response.failure(f"status {response.status_code}, expected {statuses}: {body}")
    return False


# --------------------------------------------------------------------------- users


class AnonymousBrowser(FastHttpUser):
    """Reads the public part of the site without a token."""

    weight = 3
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        # A visitor's first page calls the API without a token: every anonymous
        # user checks the refusal at least once, however short the run.
        self.api_without_token()

    @task(6)
    def article(self) -> None:
        n = random.randrange(1000)
        with self.client.get(
            f"/public/articles/{n}", name="/public/articles/[n]", catch_response=True
        ) as response:
            _expect(response, 200)

    @task(2)
    def health(self) -> None:
        with self.client.get("/healthz", catch_response=True) as response:
            _expect(response, 200)

    @task(1)
    def api_without_token(self) -> None:
        with self.client.get(
            "/api/items", name="/api/items (anonymous)", catch_response=True
        ) as response:
            if _expect(response, 403):
                OBSERVED.anonymous_denied += 1


class SignedInUser(FastHttpUser):
    """A signed-in user: its own token, from one of the issuers, with one of the scopes."""

    weight = 3
    wait_time = between(0.1, 0.5)

    def on_start(self) -> None:
        number = next(_user_numbers)
        self.scope = SCOPES[number % len(SCOPES)]
        token = mint_token(number, f"user-{number}", self.scope)
        self.headers = {"authorization": f"Bearer {token}"}

    @task(5)
    def list_items(self) -> None:
        with self.client.get("/api/items", headers=self.headers, catch_response=True) as r:
            _expect(r, 200)

    @task(3)
    def one_item(self) -> None:
        with self.client.get(
            f"/api/items/{random.randrange(500)}",
            name="/api/items/[id]",
            headers=self.headers,
            catch_response=True,
        ) as response:
            _expect(response, 200)

    @task(1)
    def write_item(self) -> None:
        can_write = "write" in self.scope.split()
        with self.client.post(
            "/api/items",
            name=f"/api/items POST ({'write' if can_write else 'read-only'})",
            headers=self.headers,
            json={"name": "widget"},
            catch_response=True,
        ) as response:
            if can_write:
                _expect(response, 200)
            elif _expect(response, 403):
                OBSERVED.read_only_denied += 1


class WriteHeavyClient(FastHttpUser):
    """Posts orders at WRITER_RPS, above its per-caller limit; 429s are expected."""

    fixed_count = 2
    wait_time = constant_throughput(WRITER_RPS)

    def on_start(self) -> None:
        number = next(_user_numbers)
        token = mint_token(0, f"writer-{number}", "read write")
        self.headers = {"authorization": f"Bearer {token}"}
        self.tally = WriterTally()
        OBSERVED.writers.append(self.tally)

    @task
    def post_order(self) -> None:
        tally = self.tally
        sent = time.monotonic()
        with self.client.post(
            "/api/orders", headers=self.headers, json={"sku": "a-1"}, catch_response=True
        ) as response:
            if response.status_code == 429 and not response.headers.get("retry-after"):
                response.failure("429 without retry-after")
                return
            if not _expect(response, 200, 429):
                return
        if tally.first_s is None:
            tally.first_s = sent
        tally.last_s = sent
        if response.status_code == 200:
            tally.allowed += 1
        else:
            tally.limited += 1


class CanaryShopper(FastHttpUser):
    """Browses the catalogue; counts which track served each answer."""

    fixed_count = 2
    wait_time = constant_throughput(CANARY_RPS)

    @task
    def catalog(self) -> None:
        with self.client.get(
            f"/public/catalog/{random.randrange(100)}",
            name="/public/catalog/[n]",
            catch_response=True,
        ) as response:
            if _expect(response, 200):
                track = response.headers.get("x-served-by") or "unknown"
                OBSERVED.served_by[track] = OBSERVED.served_by.get(track, 0) + 1


class Http2Client(User):
    """Signed-in reads over TLS with HTTP/2 (httpx + h2), reported to locust's stats."""

    fixed_count = 2
    wait_time = between(0.05, 0.2)

    def on_start(self) -> None:
        number = next(_user_numbers)
        token = mint_token(number, f"h2-user-{number}", "read")
        self.client = httpx.Client(
            base_url=HTTPS_URL,
            http2=True,
            verify=CA_FILE or False,
            timeout=10.0,
            headers={"authorization": f"Bearer {token}"},
        )

    def on_stop(self) -> None:
        self.client.close()

    @task
    def list_items(self) -> None:
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            response = self.client.get("/api/items")
            length = len(response.content)
            if response.status_code != 200:
                exception = RuntimeError(f"status {response.status_code}, expected 200")
            elif response.http_version != "HTTP/2":
                OBSERVED.other_versions += 1
                exception = RuntimeError(f"answered over {response.http_version}, not HTTP/2")
            else:
                OBSERVED.h2_responses += 1
        except httpx.HTTPError as exc:
            exception = exc
        self.environment.events.request.fire(
            request_type="GET",
            name="/api/items (HTTP/2)",
            response_time=(time.perf_counter() - started) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )


# --------------------------------------------------------------------------- checks


def _check(name: str, passed: bool, detail: str, **figures: Any) -> dict[str, Any]:
    return {"name": name, "passed": bool(passed), "detail": detail, **figures}


def ratelimit_check() -> dict[str, Any]:
    rate_per_s, burst = configured_limit()
    writers = [w for w in OBSERVED.writers if w.first_s is not None]
    sent = sum(w.allowed + w.limited for w in writers)
    allowed = sum(w.allowed for w in writers)
    limited = sum(w.limited for w in writers)
    # A fresh bucket lets `burst` through at once, then refills at the rate; a client
    # that always asks for more than that gets exactly this many through.
    admitted = sum(
        min(w.allowed + w.limited, burst + rate_per_s * (w.last_s - w.first_s))
        for w in writers  # type: ignore[operator]
    )
    expected_share = 1 - admitted / sent if sent else 0.0
    observed_share = limited / sent if sent else 0.0
    tolerance = THRESHOLDS["ratelimit_tolerance"]
    error = abs(allowed - admitted) / admitted if admitted else math.inf
    passed = bool(writers) and limited > 0 and error <= tolerance
    detail = (
        f"{rate_per_s:g}/s burst {burst} per writer, {len(writers)} writers: {allowed} allowed "
        f"of {sent} (the limit admits {admitted:.1f}, error {error:.1%}, tolerance "
        f"{tolerance:.0%}); 429 share {observed_share:.3f}, expected {expected_share:.3f}"
    )
    if not limited:
        detail += "; the writers never hit their limit, so nothing was checked"
    return _check(
        "rate limit: 429 share matches the configured limit",
        passed,
        detail,
        sent=sent,
        allowed=allowed,
        limited=limited,
        admitted=admitted,
        expected_429_share=expected_share,
        observed_429_share=observed_share,
    )


def canary_check() -> dict[str, Any]:
    weights = configured_weights()
    served = dict(OBSERVED.served_by)
    total = sum(served.values())
    canary = min(weights, key=lambda subset: weights[subset])  # the smaller share
    expected = weights[canary]
    observed = served.get(canary, 0) / total if total else 0.0
    sigma = math.sqrt(expected * (1 - expected) / total) if total else math.inf
    tolerance = max(THRESHOLDS["canary_tolerance"], 4 * sigma)
    unknown = set(served) - set(weights)
    passed = total > 0 and abs(observed - expected) <= tolerance and not unknown
    detail = (
        f"{canary} served {served.get(canary, 0)} of {total} ({observed:.3f}); weights say "
        f"{expected:.3f} ± {tolerance:.3f}; answers by track: {served}"
    )
    return _check(
        "canary: observed share matches the VirtualService weights",
        passed,
        detail,
        served_by=served,
        expected_share=expected,
        observed_share=observed,
        tolerance=tolerance,
    )


def run_checks(environment: Environment) -> list[dict[str, Any]]:
    total = environment.stats.total
    requests = total.num_requests
    error_rate = total.num_failures / requests if requests else 1.0
    checks = [
        _check(
            "error rate",
            requests > 0 and error_rate <= THRESHOLDS["max_error_rate"],
            f"{total.num_failures} failed of {requests} ({error_rate:.2%}; "
            f"threshold {THRESHOLDS['max_error_rate']:.0%})",
            requests=requests,
            failures=total.num_failures,
        ),
    ]
    p95 = total.get_response_time_percentile(0.95) if requests else None
    if CHECK_LATENCY:
        checks.append(
            _check(
                "p95 latency",
                p95 is not None and p95 <= THRESHOLDS["max_p95_ms"],
                f"p95 {p95} ms (threshold {THRESHOLDS['max_p95_ms']:g} ms)",
                p95_ms=p95,
            )
        )
    checks += [ratelimit_check(), canary_check()]
    checks.append(
        _check(
            "HTTP/2: every HTTPS answer came over HTTP/2",
            OBSERVED.h2_responses > 0 and OBSERVED.other_versions == 0,
            f"{OBSERVED.h2_responses} over HTTP/2, {OBSERVED.other_versions} over another version",
            h2_responses=OBSERVED.h2_responses,
        )
    )
    denied = OBSERVED.anonymous_denied + OBSERVED.read_only_denied
    checks.append(
        _check(
            "authorization: callers without the right token were refused",
            denied > 0,
            f"{OBSERVED.anonymous_denied} anonymous and {OBSERVED.read_only_denied} read-only "
            "writes answered 403 as expected",
            anonymous_denied=OBSERVED.anonymous_denied,
            read_only_denied=OBSERVED.read_only_denied,
        )
    )
    runner = environment.runner
    exceptions = len(runner.exceptions) if runner is not None else 0
    checks.append(
        _check(
            "no exceptions in the scenario code",
            exceptions == 0,
            f"{exceptions} distinct exceptions",
        )
    )
    return checks


@events.quitting.add_listener
def _report(environment: Environment, **_kwargs: Any) -> None:
    checks = run_checks(environment)
    print("\nload test checks:", flush=True)
    for check in checks:
        print(f"  {'PASS' if check['passed'] else 'FAIL'}  {check['name']}: {check['detail']}")
    if CHECKS_FILE:
        Path(CHECKS_FILE).write_text(json.dumps(checks, indent=2) + "\n")
    environment.process_exit_code = 0 if all(c["passed"] for c in checks) else 1
