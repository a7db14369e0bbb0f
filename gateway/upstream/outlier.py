"""Per-endpoint health as one worker sees it, and outlier ejection (passive health
checking) over it.

``EndpointState`` is the object the admin ``/clusters`` page reads: ``healthy``,
``ejected_until`` (a ``time.monotonic()`` instant, 0.0 when not ejected),
``active_requests`` and the counters behind them. ``OutlierDetector`` applies a
DestinationRule's ``outlierDetection`` the way Envoy's consecutive-error detectors do:

- every 5xx response, or local failure (connect failure, reset, timeout), adds to the
  endpoint's consecutive-5xx count; 502/503/504 and local failures also add to the
  consecutive-gateway-error count; any other response resets both counts;
- when a count reaches its threshold the endpoint is ejected, unless that would take
  the ejected share of the cluster above ``maxEjectionPercent`` (Envoy always lets the
  first ejection through, whatever the percentage);
- an ejection lasts ``baseEjectionTime`` times the number of times the endpoint has
  been ejected, at most Envoy's ``max_ejection_time`` (300 s, or ``baseEjectionTime``
  when longer; Istio does not change it); an endpoint comes back once that time has
  passed (checked when the balancer looks at it, in ``refresh``), and a healthy
  ``interval`` with no ejection brings its multiplier back down by one.

Nothing here does I/O; ``now`` is passed in so tests drive time directly.
"""

from __future__ import annotations

from ..policy import OutlierPolicy
from ..routing.table import Endpoint

__all__ = ["EndpointState", "OutlierDetector"]

_GATEWAY_STATUSES = frozenset({502, 503, 504})


class EndpointState:
    """One endpoint of one cluster in this worker. Mutable, cheap to read."""

    __slots__ = (
        "active_requests",
        "address",
        "consecutive_5xx",
        "consecutive_gateway",
        "ejected_until",
        "ejections",
        "endpoint",
        "healthy",
        "host_label",
        "key",
        "port",
        "times_ejected",
        "weight",
    )

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.address = endpoint.address
        self.port = endpoint.port
        self.weight = max(endpoint.weight, 1)
        self.key = f"{endpoint.address}:{endpoint.port}"
        self.host_label = self.key
        self.healthy = True
        self.ejected_until = 0.0
        self.active_requests = 0
        self.consecutive_5xx = 0
        self.consecutive_gateway = 0
        self.times_ejected = 0  # the ejection-time multiplier
        self.ejections = 0  # total, for the admin page


class OutlierDetector:
    """Consecutive-error ejection over the endpoints of one cluster."""

    __slots__ = ("endpoints", "last_sweep", "policy", "version")

    def __init__(self, policy: OutlierPolicy, endpoints: list[EndpointState]) -> None:
        self.policy = policy
        self.endpoints = endpoints
        self.last_sweep = 0.0
        # Bumped whenever the healthy set changes, so balancers can cache on it.
        self.version = 0

    def record_status(self, state: EndpointState, status: int, now: float) -> None:
        if status >= 500:
            self._failure(state, gateway=status in _GATEWAY_STATUSES, now=now)
        else:
            state.consecutive_5xx = 0
            state.consecutive_gateway = 0

    def record_local_failure(self, state: EndpointState, now: float) -> None:
        """Connect failure, reset or timeout: Envoy maps these to 5xx (and, being the
        gateway's own view of a dead upstream, to gateway errors too)."""
        self._failure(state, gateway=True, now=now)

    def _failure(self, state: EndpointState, *, gateway: bool, now: float) -> None:
        policy = self.policy
        state.consecutive_5xx += 1
        if gateway:
            state.consecutive_gateway += 1
        if not state.healthy:
            return
        five, gateway_limit = policy.consecutive_5xx, policy.consecutive_gateway
        if (five > 0 and state.consecutive_5xx >= five) or (
            gateway_limit > 0 and state.consecutive_gateway >= gateway_limit
        ):
            self._eject(state, now)

    def _eject(self, state: EndpointState, now: float) -> None:
        ejected = sum(1 for e in self.endpoints if not e.healthy)
        total = len(self.endpoints)
        # Envoy documents max_ejection_percent as "Defaults to 10% but will eject at
        # least one host regardless of the value": the first ejection always happens,
        # later ones only while the ejected share stays within the percentage. (Recent
        # Envoy checks the percentage on the first ejection too and keeps this for
        # always_eject_one_host, which Istio does not set; meshgate keeps the
        # documented behaviour, see docs/traffic.md.)
        if ejected and (ejected + 1) * 100 > total * self.policy.max_ejection_percent:
            return
        base_s = self.policy.base_ejection_s
        max_s = self.policy.max_ejection_s
        # Envoy stops raising the multiplier once the time it gives has passed
        # max_ejection_time, so that a long healthy spell brings it back down in a few
        # intervals, and never ejects for longer than max_ejection_time.
        if state.times_ejected * base_s < max_s + base_s:
            state.times_ejected += 1
        state.ejections += 1
        state.healthy = False
        state.ejected_until = now + min(base_s * state.times_ejected, max_s)
        state.consecutive_5xx = 0
        state.consecutive_gateway = 0
        self.version += 1

    def refresh(self, now: float) -> None:
        """Bring back endpoints whose ejection time is over; once per ``interval``,
        lower the multiplier of endpoints that stayed healthy."""
        changed = False
        for state in self.endpoints:
            if not state.healthy and state.ejected_until <= now:
                state.healthy = True
                state.ejected_until = 0.0
                changed = True
        if now - self.last_sweep >= self.policy.interval_s:
            self.last_sweep = now
            for state in self.endpoints:
                if state.healthy and state.times_ejected:
                    state.times_ejected -= 1
        if changed:
            self.version += 1
