"""The hosts file (``/etc/hosts``) as the egress resolver's first source of answers.

Envoy's resolver consults the hosts file before DNS, so a name pinned there (a
Kubernetes pod's ``hostAliases``, a test machine's local names) reaches the address it
names; meshgate's egress gateway does the same. ``HostsFile.lookup(name)`` returns the
IPv4 addresses the file gives a name (else its IPv6 ones, the order the resolver uses
for DNS answers), or None when the file does not name it.

The file is read again when its modification time or size changes, looked at no more
than once per ``check_every_s``, so an edit is picked up within about a second
without a stat per request. A file that is missing or unreadable names nothing.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import time

__all__ = ["HostsFile", "parse_hosts"]

log = logging.getLogger("meshgate.egress.dns")


def parse_hosts(text: str) -> dict[str, tuple[str, ...]]:
    """``name -> addresses`` (IPv4 if the file gives any, else IPv6; in file order,
    without repeats). Names are matched case-insensitively, with no trailing dot;
    comments (``#`` to the end of a line) and lines whose first field is not an
    address are ignored. Link-local IPv6 with a zone (``fe80::1%eth0``) is skipped:
    a zone means nothing to the gateway's upstream connections."""
    v4: dict[str, list[str]] = {}
    v6: dict[str, list[str]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or "%" in fields[0]:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        table = v4 if address.version == 4 else v6
        text_address = str(address)
        for name in fields[1:]:
            key = name.lower().rstrip(".")
            if not key:
                continue
            known = table.setdefault(key, [])
            if text_address not in known:
                known.append(text_address)
    names: dict[str, tuple[str, ...]] = {name: tuple(found) for name, found in v6.items()}
    names.update((name, tuple(found)) for name, found in v4.items())
    return names


class HostsFile:
    """A hosts file, re-read when it changes (see the module docstring)."""

    def __init__(self, path: str = "/etc/hosts", check_every_s: float = 1.0) -> None:
        self.path = path
        self.check_every_s = check_every_s
        self._names: dict[str, tuple[str, ...]] = {}
        self._stamp: tuple[int, int] | None = None
        self._next_check = 0.0
        self.reads = 0  # how often the file was parsed (tests read it)

    def lookup(self, name: str) -> tuple[str, ...] | None:
        """The addresses the file gives ``name``, or None."""
        if not self.path:
            return None
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.check_every_s
            self._refresh()
        names = self._names
        if not names:
            return None
        # Asked on every egress request: the name as given first (hosts from the
        # configuration are already lower-case), normalised only when that misses.
        found = names.get(name)
        if found is None:
            key = name.lower().rstrip(".")
            if key != name:
                found = names.get(key)
        return found

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            if self._stamp is not None:
                log.info("hosts file %s is gone: it names nothing now", self.path)
            self._names, self._stamp = {}, None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError as exc:
            log.info("hosts file %s unreadable (%s): it names nothing now", self.path, exc)
            self._names, self._stamp = {}, None
            return
        self._names = parse_hosts(text)
        self._stamp = stamp
        self.reads += 1
