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

__all__ = ["SecurityStats"]


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class SecurityStats:
    """Decision counters of one process."""

    def __init__(self) -> None:
        self.jwt: dict[tuple[str, str], int] = {}
        self.authz: dict[tuple[str, str, str], int] = {}

    def jwt_result(self, result: str, reason: str = "") -> None:
        key = (result, reason)
        self.jwt[key] = self.jwt.get(key, 0) + 1

    def authz_decision(self, decision: str, action: str, policy: str) -> None:
        key = (decision, action, policy)
        self.authz[key] = self.authz.get(key, 0) + 1

    def export(self) -> dict[str, Any]:
        return {
            "jwt": [[*k, v] for k, v in sorted(self.jwt.items())],
            "authz": [[*k, v] for k, v in sorted(self.authz.items())],
        }

    def collect_text(self, jwks_health: Iterable[Mapping[str, Any]] = ()) -> str:
        lines = [
            "# TYPE meshgate_jwt_requests_total counter",
            *(
                f'meshgate_jwt_requests_total{{result="{r}",reason="{_label(why)}"}} {n}'
                for (r, why), n in sorted(self.jwt.items())
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
