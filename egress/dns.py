"""Asynchronous name resolution for the egress gateway, with the answers' TTLs honoured.

``Resolver.resolve(name)`` returns the IPv4 (else IPv6) addresses of a name. Answers
are cached until their TTL runs out (``min_ttl_s`` is a floor, 0 by default), and
concurrent requests for one name share one query, so a burst costs one round trip.
A failure (no such name, no answer, a server that does not reply in time) raises
``ResolutionFailed``; it is not cached, so the next request asks again.

Built on dnspython's asyncio resolver: pure Python (no C library to build), it reads
/etc/resolv.conf or takes the servers it is given, reports each answer's TTL, and
runs on any asyncio loop, uvloop included. The gateway's upstream pools connect to
the addresses found here, never to a name, so no blocking ``getaddrinfo`` runs in a
thread and the TTL is the DNS server's, not the C library's.

IP literals are returned as they are, without a query. Names the hosts file gives
(``/etc/hosts`` unless told otherwise, ``egress/hosts.py``) are answered from it before
any DNS query, as Envoy's resolver does.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from .hosts import HostsFile

__all__ = ["NoDnsServers", "ResolutionFailed", "Resolver", "parse_server"]

log = logging.getLogger("meshgate.egress.dns")

_MAX_CACHED = 4096  # names; the cache is dropped whole past this (a bound, not an LRU)


class ResolutionFailed(Exception):
    """A name could not be resolved; the message says why."""


class NoDnsServers(Exception):
    """No server was given and the resolver configuration names none."""


def parse_server(text: str) -> tuple[str, int]:
    """``10.0.0.2`` -> (10.0.0.2, 53); ``127.0.0.1:5353``; ``[::1]:5353``."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    ipaddress.ip_address(host)  # ValueError for anything but an address
    number = int(port) if port else 53
    if not 0 < number < 65536:
        raise ValueError(f"port {number} out of range")
    return host, number


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class Resolver:
    """A TTL-honouring cache in front of dnspython's asyncio resolver."""

    def __init__(
        self,
        servers: Sequence[str] = (),
        timeout_s: float = 5.0,
        min_ttl_s: float = 0.0,
        resolv_conf: str = "/etc/resolv.conf",
        hosts_file: str = "/etc/hosts",
    ) -> None:
        if servers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(host, port)
                for host, port in (parse_server(s) for s in servers)
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(filename=resolv_conf)
            except dns.resolver.NoResolverConfiguration as exc:
                raise NoDnsServers(
                    f"no DNS server to ask: {resolv_conf}: {exc}; give --dns-server"
                ) from exc
        # One deadline for the whole lookup, servers and retries included.
        resolver.lifetime = timeout_s
        resolver.timeout = timeout_s
        # dnspython's own cache is left off: this class keeps the TTL-bound cache,
        # so that what is cached and for how long is decided in one place.
        resolver.cache = None
        self._resolver = resolver
        self.min_ttl_s = min_ttl_s
        self._cache: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._inflight: dict[str, asyncio.Future[tuple[str, ...]]] = {}
        self.queries = 0  # sent to a server (the admin page and tests read it)
        # "" turns the hosts file off.
        self.hosts = HostsFile(hosts_file)

    def cached(self, name: str) -> tuple[str, ...] | None:
        """The addresses of ``name`` while its answer is fresh, else None; no I/O
        (but a stat of the hosts file at most once a second)."""
        pinned = self.hosts.lookup(name)
        if pinned:
            return pinned
        entry = self._cache.get(name)
        if entry is None:
            if not _is_ip(name):
                return None
            # Kept for good: an address is its own answer, and the dict probe is
            # cheaper than parsing it again on every request.
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()
            entry = self._cache[name] = (math.inf, (name,))
        if entry[0] <= time.monotonic():
            del self._cache[name]
            return None
        return entry[1]

    async def resolve(self, name: str) -> tuple[str, ...]:
        """The addresses of ``name``: from the cache while fresh, else one query
        shared with every request asking at the same time."""
        addresses = self.cached(name)
        if addresses is not None:
            return addresses
        pending = self._inflight.get(name)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._inflight[name] = pending
            try:
                result = await self._query(name)
            except ResolutionFailed as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: no "never retrieved" warning when alone
                raise
            except BaseException:
                pending.cancel()  # the asking request went away: the others ask again
                raise
            finally:
                del self._inflight[name]
            pending.set_result(result)
            return result
        return await asyncio.shield(pending)

    async def _query(self, name: str) -> tuple[str, ...]:
        self.queries += 1
        last: Exception | None = None
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await self._resolver.resolve(name, rdtype, search=False)
            except dns.resolver.NXDOMAIN as exc:
                raise ResolutionFailed(f"{name}: no such name") from exc
            except dns.resolver.NoAnswer as exc:
                last = exc
                continue  # no A record: try AAAA
            except (dns.exception.Timeout, dns.resolver.LifetimeTimeout) as exc:
                raise ResolutionFailed(f"{name}: no answer from the DNS server in time") from exc
            except (dns.exception.DNSException, OSError) as exc:
                raise ResolutionFailed(f"{name}: {exc}") from exc
            addresses = tuple(sorted(rr.address for rr in answer))
            rrset = answer.rrset
            ttl = float(rrset.ttl) if rrset is not None else 0.0
            ttl = max(ttl, self.min_ttl_s)
            if ttl > 0:
                if len(self._cache) >= _MAX_CACHED:
                    self._cache.clear()
                self._cache[name] = (time.monotonic() + ttl, addresses)
            log.debug("resolved %s -> %s (ttl %ss)", name, addresses, ttl)
            return addresses
        raise ResolutionFailed(f"{name}: no A or AAAA record") from last
