"""Request matching against a compiled Snapshot: host lookup, then first matching route.

No I/O, no allocation proportional to configuration size.
"""

from __future__ import annotations

from typing import Protocol

from .table import Listener, Route, VirtualHost

__all__ = ["MatchableRequest", "find_virtual_host", "match_route"]


class MatchableRequest(Protocol):
    """What matching reads of a request (``gateway.server.events.RequestHead`` fits)."""

    method: str
    path: str
    query: str
    authority: str
    scheme: str
    port: int

    def header(self, name: str) -> str | None: ...


def find_virtual_host(listener: Listener, authority: str) -> VirtualHost | None:
    """Exact host, then the longest ``*.suffix``, then ``*``; the port is ignored."""
    raise NotImplementedError


def match_route(vhost: VirtualHost, request: MatchableRequest) -> Route | None:
    """The first route of ``vhost`` whose matches accept ``request``."""
    raise NotImplementedError
