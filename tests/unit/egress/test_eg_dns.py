"""egress.dns: real queries to a DNS server on 127.0.0.1 (tests/dns_server.py)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dns_server import DnsServer

from egress.dns import NoDnsServers, ResolutionFailed, Resolver, parse_server
from egress.hosts import HostsFile, parse_hosts


@pytest.fixture
def server() -> Iterator[DnsServer]:
    dns = DnsServer()
    try:
        yield dns
    finally:
        dns.stop()


def test_answer_is_cached_for_its_ttl(server: DnsServer) -> None:
    server.set("api.example.test", ["127.0.0.5"], ttl=300)
    resolver = Resolver([server.address], timeout_s=2)

    async def main() -> None:
        assert await resolver.resolve("api.example.test") == ("127.0.0.5",)
        server.set("api.example.test", ["127.0.0.6"], ttl=300)
        assert await resolver.resolve("api.example.test") == ("127.0.0.5",)
        assert resolver.cached("api.example.test") == ("127.0.0.5",)

    asyncio.run(main())
    assert server.count("api.example.test") == 1


def test_ttl_zero_asks_again_and_sees_the_new_address(server: DnsServer) -> None:
    server.set("moving.example.test", ["127.0.0.5"], ttl=0)
    resolver = Resolver([server.address], timeout_s=2)

    async def main() -> None:
        assert await resolver.resolve("moving.example.test") == ("127.0.0.5",)
        assert resolver.cached("moving.example.test") is None
        server.set("moving.example.test", ["127.0.0.6", "127.0.0.7"], ttl=0)
        assert await resolver.resolve("moving.example.test") == ("127.0.0.6", "127.0.0.7")

    asyncio.run(main())
    assert server.count("moving.example.test") == 2


def test_concurrent_requests_for_one_name_share_one_query(server: DnsServer) -> None:
    server.set("busy.example.test", ["127.0.0.5"], ttl=60)
    resolver = Resolver([server.address], timeout_s=2)

    async def main() -> list[tuple[str, ...]]:
        return await asyncio.gather(*(resolver.resolve("busy.example.test") for _ in range(20)))

    assert set(asyncio.run(main())) == {("127.0.0.5",)}
    assert server.count("busy.example.test") == 1


def test_unknown_name_fails_and_is_not_cached(server: DnsServer) -> None:
    resolver = Resolver([server.address], timeout_s=2)

    async def main() -> None:
        for _ in range(2):
            with pytest.raises(ResolutionFailed, match="no such name"):
                await resolver.resolve("nowhere.example.test")

    asyncio.run(main())
    assert server.count("nowhere.example.test") == 2


def test_silent_server_fails_within_the_timeout() -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        resolver = Resolver([f"127.0.0.1:{silent.getsockname()[1]}"], timeout_s=0.3)
        started = time.monotonic()
        with pytest.raises(ResolutionFailed, match="in time"):
            asyncio.run(resolver.resolve("api.example.test"))
        assert time.monotonic() - started < 3
    finally:
        silent.close()


def test_ip_literals_need_no_query(server: DnsServer) -> None:
    resolver = Resolver([server.address], timeout_s=2)
    assert asyncio.run(resolver.resolve("127.0.0.9")) == ("127.0.0.9",)
    assert sum(server.queries.values()) == 0


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("10.0.0.2", ("10.0.0.2", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:53", ("::1", 53)),
    ],
)
def test_dns_server_addresses_parse(text: str, parsed: tuple[str, int]) -> None:
    assert parse_server(text) == parsed


@pytest.mark.parametrize("text", ["dns.example.test", "127.0.0.1:0", "127.0.0.1:x"])
def test_bad_dns_server_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text)


def test_no_servers_given_and_none_configured_is_said_plainly(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("search example.test\n")
    with pytest.raises(NoDnsServers, match="give --dns-server"):
        Resolver(resolv_conf=str(conf))
    conf.write_text("nameserver 127.0.0.1\n")
    Resolver(resolv_conf=str(conf))  # configured now: no complaint


# --------------------------------------------------------------------------- hosts file


def test_hosts_file_parses_aliases_comments_and_prefers_ipv4() -> None:
    names = parse_hosts(
        """
# a comment line
127.0.0.1   localhost
10.0.0.5    api.corp.test  api   # trailing comment
10.0.0.6    API.corp.test.
::1         localhost ip6-localhost
fd00::7     v6only.corp.test
fe80::1%eth0 zoned.corp.test
not-an-address  broken.corp.test
10.0.0.5    api.corp.test
"""
    )
    assert names["api.corp.test"] == ("10.0.0.5", "10.0.0.6")  # file order, no repeats
    assert names["api"] == ("10.0.0.5",)
    assert names["localhost"] == ("127.0.0.1",)  # IPv4 first, as for DNS answers
    assert names["ip6-localhost"] == ("::1",)
    assert names["v6only.corp.test"] == ("fd00::7",)
    assert "zoned.corp.test" not in names
    assert "broken.corp.test" not in names


def test_hosts_file_is_read_again_when_it_changes(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("10.1.1.1 pinned.test\n")
    hosts = HostsFile(str(path), check_every_s=0)
    assert hosts.lookup("PINNED.test.") == ("10.1.1.1",)
    assert hosts.lookup("pinned.test") == ("10.1.1.1",)
    assert hosts.reads == 1  # unchanged: not parsed again
    path.write_text("10.2.2.2 pinned.test other.test\n")
    assert hosts.lookup("pinned.test") == ("10.2.2.2",)
    assert hosts.lookup("other.test") == ("10.2.2.2",)
    path.unlink()
    assert hosts.lookup("pinned.test") is None


def test_hosts_file_is_looked_at_at_most_once_per_interval(tmp_path: Path) -> None:
    path = tmp_path / "hosts"
    path.write_text("10.1.1.1 pinned.test\n")
    hosts = HostsFile(str(path), check_every_s=3600)
    assert hosts.lookup("pinned.test") == ("10.1.1.1",)
    path.write_text("10.9.9.9 pinned.test\n")
    assert hosts.lookup("pinned.test") == ("10.1.1.1",)  # not stat-ed again yet


def test_resolver_answers_from_the_hosts_file_before_dns(server: DnsServer, tmp_path: Path) -> None:
    server.set("pinned.example.test", ["127.0.0.5"], ttl=300)
    path = tmp_path / "hosts"
    path.write_text("127.0.0.9 pinned.example.test\n")
    resolver = Resolver([server.address], timeout_s=2, hosts_file=str(path))
    without = Resolver([server.address], timeout_s=2, hosts_file="")

    async def main() -> None:
        assert await resolver.resolve("pinned.example.test") == ("127.0.0.9",)
        assert resolver.cached("pinned.example.test") == ("127.0.0.9",)
        assert await without.resolve("pinned.example.test") == ("127.0.0.5",)

    asyncio.run(main())
    assert resolver.queries == 0
    assert server.count("pinned.example.test") == 1  # only the resolver without the file
