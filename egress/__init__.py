"""meshgate's egress gateway: controlled exits from the mesh on the gateway's engine.

``registry`` compiles the ServiceEntry hosts traffic may leave for, ``dns`` resolves
their names with the answers' TTLs, ``forward`` decides and dials each request and
CONNECT tunnel, ``passthrough`` splices SNI-routed TLS, and ``runtime`` wires them
into a gateway process (``meshgate egress``).
"""

from .registry import (
    ALLOW_ANY,
    POLICIES,
    REGISTRY_ONLY,
    EgressRegistry,
    EgressSettings,
    attach_egress,
)

__all__ = [
    "ALLOW_ANY",
    "POLICIES",
    "REGISTRY_ONLY",
    "EgressRegistry",
    "EgressSettings",
    "attach_egress",
]
