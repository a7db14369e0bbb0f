"""JWKS fetching and caching: one entry per URI, shared by every rule that names it.

    JwksRegistry(settings)
      .sync(uris_with_timeouts)   make sure an entry (and its refresh task) exists
      .prepare(...)               the same, then wait (bounded) for first fetches
      .keys(uri)                  the last good KeySet, or None before any success
      .refetch_for_unknown_kid(uri) -> awaitable | None   (rate-limited)
      .health()                   per-URI status for metrics and /config_dump
      .close()

What production needs, and Istio's defaults where it has them:

- HTTPS only, except to 127.0.0.0/8 and ::1 (local development and tests) or when
  ``allow_http`` is set. A CA bundle can be given for private PKI.
- Refreshed in the background every ``refresh_s`` (20 minutes, Istio's default).
- A token naming a ``kid`` the cached set does not have triggers one immediate
  refetch, at most once per ``kid_cooldown_s``: a stream of garbage kids cannot
  turn the gateway into a load generator against the identity provider.
- Down at start: retried with exponential backoff from ``retry_initial_s`` up to
  ``retry_max_s`` (seconds, where Istio waits for the next 20-minute refresh), never
  caching an empty set. Until a first success, tokens for that URI are refused
  (401), never answered 500 and never left hanging.
- Down later: the last good set keeps serving; a log line and the failure counter
  say so; the refresh is retried with the same backoff until it succeeds.

The data plane only ever calls ``keys`` (a dict lookup) and, on an unknown kid,
``refetch_for_unknown_kid``; everything else runs in background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .jwt import KeySet, parse_jwks

__all__ = ["JwksEntry", "JwksRegistry", "JwksSettings", "jwks_uri_problem"]

log = logging.getLogger("meshgate.jwks")

MAX_JWKS_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class JwksSettings:
    refresh_s: float = 1200.0
    kid_cooldown_s: float = 30.0
    retry_initial_s: float = 0.5
    retry_max_s: float = 30.0
    allow_http: bool = False
    ca_file: str | None = None
    startup_wait_s: float = 5.0  # how long ``prepare`` waits for first fetches


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def jwks_uri_problem(uri: str, allow_http: bool) -> str | None:
    """Why ``uri`` may not be fetched, or None."""
    parts = urlsplit(uri)
    if parts.scheme == "https":
        return None if parts.hostname else "has no host"
    if parts.scheme == "http":
        if allow_http or _is_loopback(parts.hostname or ""):
            return None
        return "uses plain HTTP to a non-loopback host (allowed only with --jwks-allow-http)"
    return f"scheme {parts.scheme!r} is not https"


class JwksEntry:
    """The cache and the health of one JWKS URI."""

    def __init__(self, uri: str, timeout_s: float) -> None:
        self.uri = uri
        self.timeout_s = timeout_s
        self.keys: KeySet | None = None
        self.generation = 0  # bumped on every successful fetch with new content
        self.body: bytes = b""
        self.last_success: float | None = None  # unix seconds
        self.last_error: str = ""
        self.last_error_time: float | None = None
        self.fetches = 0
        self.failures = 0
        self.kid_refetches = 0
        self.last_kid_refetch = -1e18  # monotonic
        self.first_attempt_done = asyncio.Event()
        self._first_attempt: asyncio.Future[bool] | None = None
        self.refresh_now = asyncio.Event()
        # Set after every attempt (success or failure), for whoever waits on one.
        self.attempted = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.inflight: asyncio.Future[bool] | None = None

    def first_attempt(self) -> asyncio.Future[bool]:
        """A future done when the first fetch attempt has ended (shared, never raises):
        a request arriving before keys were ever fetched waits for it, bounded."""
        if self._first_attempt is None:
            self._first_attempt = asyncio.get_running_loop().create_future()
            if self.first_attempt_done.is_set():
                self._first_attempt.set_result(self.keys is not None)
        return self._first_attempt

    def health(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "keys": len(self.keys.keys) if self.keys is not None else 0,
            "lastSuccess": self.last_success,
            "lastError": self.last_error or None,
            "lastErrorTime": self.last_error_time,
            "fetches": self.fetches,
            "failures": self.failures,
            "unknownKidRefetches": self.kid_refetches,
            "serving": "keys" if self.keys is not None else "none yet",
        }


class JwksRegistry:
    """Every JWKS URI this process needs, each fetched by one background task."""

    def __init__(self, settings: JwksSettings | None = None) -> None:
        self.settings = settings or JwksSettings()
        self.entries: dict[str, JwksEntry] = {}
        self._client: Any = None
        self._closed = False

    # ---------------------------------------------------------------- data plane

    def entry(self, uri: str) -> JwksEntry | None:
        return self.entries.get(uri)

    def keys(self, uri: str) -> KeySet | None:
        entry = self.entries.get(uri)
        return entry.keys if entry is not None else None

    def refetch_for_unknown_kid(self, uri: str) -> asyncio.Future[bool] | None:
        """A future that completes when a refetch is done, or None in cool-down."""
        entry = self.entries.get(uri)
        if entry is None:
            return None
        if entry.inflight is not None and not entry.inflight.done():
            return entry.inflight
        now = time.monotonic()
        if now - entry.last_kid_refetch < self.settings.kid_cooldown_s:
            return None
        entry.last_kid_refetch = now
        entry.kid_refetches += 1
        return self._start_fetch(entry)

    # ---------------------------------------------------------------- lifecycle

    def sync(self, uris: Iterable[tuple[str, float]]) -> None:
        """Start tasks for URIs not seen before. Needs a running event loop.

        Entries for URIs no longer configured stay (cheap) so a reload that brings
        a URI back finds its keys warm.
        """
        loop = asyncio.get_running_loop()
        for uri, timeout_s in uris:
            entry = self.entries.get(uri)
            if entry is None:
                entry = JwksEntry(uri, timeout_s)
                self.entries[uri] = entry
                problem = jwks_uri_problem(uri, self.settings.allow_http)
                if problem is not None:
                    entry.last_error = f"not fetched: {uri} {problem}"
                    entry.last_error_time = time.time()
                    entry.first_attempt_done.set()
                    log.error("jwks %s", entry.last_error)
                    continue
                entry.task = loop.create_task(self._run(entry), name=f"jwks {uri}")
            else:
                entry.timeout_s = timeout_s

    async def prepare(self, uris: Iterable[tuple[str, float]]) -> None:
        """``sync``, then wait until each new URI had its first attempt (bounded)."""
        uris = list(uris)
        self.sync(uris)
        waits = [self.entries[u].first_attempt_done.wait() for u, _ in uris]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.startup_wait_s):
                    await asyncio.gather(*waits)

    async def close(self) -> None:
        self._closed = True
        tasks = [e.task for e in self.entries.values() if e.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def health(self) -> list[dict[str, Any]]:
        return [self.entries[uri].health() for uri in sorted(self.entries)]

    # ---------------------------------------------------------------- fetching

    def _http(self) -> Any:
        if self._client is None:
            import httpx  # off the hot path: only the fetch tasks use it

            verify: Any = True
            if self.settings.ca_file:
                # The system's CAs and the given bundle (a private PKI) both count.
                verify = ssl.create_default_context()
                verify.load_verify_locations(cafile=self.settings.ca_file)
            # Redirects are not followed: a JWKS URI is configuration, and following
            # one would let whoever controls it point meshgate at another host.
            self._client = httpx.AsyncClient(verify=verify, follow_redirects=False)
        return self._client

    def _start_fetch(self, entry: JwksEntry) -> asyncio.Future[bool]:
        future = asyncio.ensure_future(self._fetch_once(entry))
        entry.inflight = future
        return future

    async def _fetch_once(self, entry: JwksEntry) -> bool:
        """One attempt; records success or failure, never raises (but cancels)."""
        entry.fetches += 1
        try:
            client = self._http()
            async with asyncio.timeout(entry.timeout_s):
                response = await client.get(entry.uri, headers={"accept": "application/json"})
            if response.status_code != 200:
                raise ValueError(f"HTTP {response.status_code}")
            body = response.content
            if len(body) > MAX_JWKS_BYTES:
                raise ValueError(f"document larger than {MAX_JWKS_BYTES} bytes")
            keys = parse_jwks(body)
            if not keys.keys:
                raise ValueError("no usable keys (" + "; ".join(keys.skipped) + ")")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure keeps the last good keys
            entry.failures += 1
            entry.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            entry.last_error_time = time.time()
            if entry.keys is not None:
                log.warning(
                    "jwks fetch from %s failed (%s); serving the last good key set",
                    entry.uri,
                    entry.last_error,
                )
            else:
                log.warning(
                    "jwks fetch from %s failed (%s); no keys yet", entry.uri, entry.last_error
                )
            return False
        finally:
            entry.first_attempt_done.set()
            entry.attempted.set()
            first = entry._first_attempt
            if first is not None and not first.done():
                # Resolved after the keys are stored (below) by the time a waiter runs.
                first.set_result(True)
        if body != entry.body:
            entry.body = body
            entry.keys = keys
            entry.generation += 1
        entry.last_success = time.time()
        entry.last_error = ""
        return True

    async def _run(self, entry: JwksEntry) -> None:
        """First fetch with backoff, then periodic refresh (backoff again on failure)."""
        settings = self.settings
        delay = settings.retry_initial_s
        while not self._closed:
            inflight = entry.inflight
            if inflight is None or inflight.done():
                inflight = self._start_fetch(entry)
            if await inflight:
                delay = settings.retry_initial_s
                wait = settings.refresh_s
            else:
                wait = delay
                delay = min(delay * 2, settings.retry_max_s)
            entry.refresh_now.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await entry.refresh_now.wait()
