"""The routing engine: compile a validated Model into a Snapshot, match requests on it."""

from .match import find_virtual_host, match_route
from .table import Snapshot

__all__ = ["Snapshot", "find_virtual_host", "match_route"]
