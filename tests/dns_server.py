"""A tiny authoritative DNS server for tests: UDP on 127.0.0.1, built with dnspython.

``records`` maps a name to ``(addresses, ttl)``; A queries get the IPv4 addresses,
AAAA queries the IPv6 ones, unknown names NXDOMAIN. ``queries`` counts the questions
per name, so a test can see whether the gateway asked again (the TTL at work).
It runs in a thread of its own and never leaves loopback.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from collections import Counter

import dns.flags
import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self) -> None:
        self.records: dict[str, tuple[list[str], int]] = {}
        self.queries: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)  # so that stop() is noticed; not a synchronisation
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def set(self, name: str, addresses: list[str], ttl: int) -> None:
        with self.lock:
            self.records[name.lower().rstrip(".")] = (addresses, ttl)

    def count(self, name: str) -> int:
        with self.lock:
            return self.queries[name]

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            self.sock.sendto(self._answer(query).to_wire(), peer)

    def _answer(self, query: dns.message.Message) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        question = query.question[0]
        name = question.name.to_text().lower().rstrip(".")
        with self.lock:
            if question.rdtype == dns.rdatatype.A:
                self.queries[name] += 1
            entry = self.records.get(name)
        if entry is None:
            response.set_rcode(dns.rcode.NXDOMAIN)
            return response
        addresses, ttl = entry
        version = 4 if question.rdtype == dns.rdatatype.A else 6
        wanted = [a for a in addresses if ipaddress.ip_address(a).version == version]
        if wanted and question.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            response.answer.append(
                dns.rrset.from_text_list(
                    question.name, ttl, dns.rdataclass.IN, question.rdtype, wanted
                )
            )
        return response

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()
