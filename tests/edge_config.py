"""The configuration the TLS unit tests share: a Gateway ``edge`` with the server
entries a test gives, and one VirtualService answering every request with 200."""

from __future__ import annotations

from pathlib import Path

from gateway.config.load import load_config
from gateway.routing.compile import compile_snapshot
from gateway.routing.table import Snapshot


def edge_yaml(servers: str) -> str:
    """``servers``: the YAML list items under ``spec.servers``, indented by four."""
    return f"""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
{servers.rstrip()}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: all, namespace: default}}
spec:
  hosts: ["*"]
  gateways: [edge]
  http:
    - directResponse: {{status: 200}}
"""


def compile_edge(tmp: Path, servers: str) -> Snapshot:
    """``edge_yaml(servers)`` written to ``tmp/config`` (replacing what a previous call
    wrote there) and compiled for an ``istio=ingressgateway`` gateway."""
    (tmp / "config").mkdir(exist_ok=True)
    (tmp / "config" / "gateway.yaml").write_text(edge_yaml(servers))
    return compile_snapshot(load_config([str(tmp / "config")]), {"istio": "ingressgateway"})
