"""Counters for authentication and authorization decisions, and their exposition.

Plain integers in dicts: a request adds one to one counter (a dict lookup), never a
prometheus-client ``labels().inc()`` on the hot path. ``collect_text`` renders the
counters and the JWKS health in Prometheus' text format when scraped.

    meshgate_jwt_requests_total{result="accepted|missing|rejected", reason="..."}
    meshgate_authz_decisions_total{decision="allow|deny", action="...", policy="ns/name"}
    meshgate_jwks_keys{uri=...}, meshgate_jwks_fetch_failures_total{uri=...},
    meshgate_jwks_last_success_timestamp_seconds{uri=...}
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["SecurityStats", "render_exports"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class SecurityStats:
    """Decision counters of one process."""

    def __init__(self) -> None:
        self.jwt: dict[tuple[str, str], int] = {}
        self.authz: dict[tuple[str, str, str], int] = {}
        # The two outcomes of almost every request, as plain attributes: the JWT
        # stage's hot path adds to them without building a key.
        self.accepted = 0
        self.missing = 0

    def _jwt_counts(self) -> dict[tuple[str, str], int]:
        counts = dict(self.jwt)
        for result, n in (("accepted", self.accepted), ("missing", self.missing)):
            if n:
                counts[(result, "")] = counts.get((result, ""), 0) + n
        return counts

    def jwt_result(self, result: str, reason: str = "") -> None:
        key = (result, reason)
        self.jwt[key] = self.jwt.get(key, 0) + 1

    def authz_decision(self, decision: str, action: str, policy: str) -> None:
        key = (decision, action, policy)
        self.authz[key] = self.authz.get(key, 0) + 1

    def export(self) -> dict[str, Any]:
        return {
            "jwt": [[*k, v] for k, v in sorted(self._jwt_counts().items())],
            "authz": [[*k, v] for k, v in sorted(self.authz.items())],
        }

    def collect_text(self, jwks_health: Iterable[Mapping[str, Any]] = ()) -> str:
        lines = [
            "# TYPE meshgate_jwt_requests_total counter",
            *(
                f'meshgate_jwt_requests_total{{result="{r}",reason="{_label(why)}"}} {n}'
                for (r, why), n in sorted(self._jwt_counts().items())
            ),
            "# TYPE meshgate_authz_decisions_total counter",
            *(
                f'meshgate_authz_decisions_total{{decision="{d}",action="{a}",'
                f'policy="{_label(p)}"}} {n}'
                for (d, a, p), n in sorted(self.authz.items())
            ),
            "# TYPE meshgate_jwks_keys gauge",
            "# TYPE meshgate_jwks_fetch_failures_total counter",
            "# TYPE meshgate_jwks_last_success_timestamp_seconds gauge",
        ]
        for h in jwks_health:
            uri = _label(str(h["uri"]))
            lines.append(f'meshgate_jwks_keys{{uri="{uri}"}} {h["keys"]}')
            lines.append(f'meshgate_jwks_fetch_failures_total{{uri="{uri}"}} {h["failures"]}')
            if h["lastSuccess"] is not None:
                lines.append(
                    f'meshgate_jwks_last_success_timestamp_seconds{{uri="{uri}"}} '
                    f"{h['lastSuccess']:.3f}"
                )
        return "\n".join(lines) + "\n"


def render_exports(statuses: Iterable[Mapping[str, Any]]) -> bytes:
    """Prometheus text for the ``SecurityRuntime.status()`` of every serving process:
    decision counters summed, JWKS health per URI (the freshest process's)."""
    merged = SecurityStats()
    health: dict[str, Mapping[str, Any]] = {}
    for status in statuses:
        decisions = status.get("decisions", {})
        for result, reason, n in decisions.get("jwt", []):
            merged.jwt[(result, reason)] = merged.jwt.get((result, reason), 0) + n
        for decision, action, policy, n in decisions.get("authz", []):
            key = (decision, action, policy)
            merged.authz[key] = merged.authz.get(key, 0) + n
        for h in status.get("jwks", []):
            seen = health.get(h["uri"])
            if seen is None or (h["lastSuccess"] or 0) > (seen["lastSuccess"] or 0):
                health[h["uri"]] = h
    return merged.collect_text(health[uri] for uri in sorted(health)).encode()
