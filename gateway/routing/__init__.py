"""The routing engine: compile a validated Model into a Snapshot, match requests on it.

``compile_snapshot`` is the control half (cold, exhaustive); ``find_virtual_host``,
``match_route``, ``pick_destination`` and ``rewrite_path`` are the data half (hot, no
work proportional to configuration). ``snapshot_to_dict``/``format_routes`` render a
Snapshot for the admin API, goldens and ``meshgate routes``. Nothing here does I/O.
"""

from .compile import compile_snapshot
from .dump import format_routes, snapshot_to_dict
from .match import (
    MatchableRequest,
    find_virtual_host,
    match_route,
    pick_destination,
    rewrite_path,
)
from .table import Snapshot

__all__ = [
    "MatchableRequest",
    "Snapshot",
    "compile_snapshot",
    "find_virtual_host",
    "format_routes",
    "match_route",
    "pick_destination",
    "rewrite_path",
    "snapshot_to_dict",
]
