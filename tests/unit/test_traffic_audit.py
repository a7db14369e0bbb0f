"""Traffic-policy semantics checked against Istio's and Envoy's documented behaviour:
which failures each ``retryOn`` condition retries, the deprecated outlier
``consecutiveErrors``, the cap on ejection time, ``minHealthPercent`` panic mode,
retries under consistent hashing, Envoy's retry back-off bounds and Istio 1.26's
``retryIgnorePreviousHosts`` and ``backoff``."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from gateway.config.errors import ConfigErrors
from gateway.config.load import load_resources
from gateway.config.validate import NOT_ENFORCED, validate
from gateway.policy import (
    OutlierPolicy,
    RetryPolicy,
    compile_cluster_traffic,
    compile_route_traffic,
)
from gateway.routing.table import Cluster, Endpoint
from gateway.traffic import ClusterState, TrafficForwarder
from gateway.upstream.lb import hash_key
from gateway.upstream.outlier import EndpointState, OutlierDetector


def clusters(dest: object) -> str:
    assert isinstance(dest, dict)
    return f"outbound|80||{dest['host']}"


def retry_on(conditions: str) -> RetryPolicy:
    traffic = compile_route_traffic({"retries": {"attempts": 2, "retryOn": conditions}}, clusters)
    assert traffic is not None and traffic.retry is not None
    return traffic.retry


# --------------------------------------------------------------------------- retryOn


@pytest.mark.parametrize("flag", ["UF", "UR", "UT", "UPE", "REFUSED"])
def test_reset_retries_every_failure_without_a_response(flag: str) -> None:
    # Envoy's wouldRetryFromReset: RETRY_ON_RESET retries any reset reason, a
    # connection failure and a per-try timeout (a local reset) included.
    assert retry_on("reset").retry_on_error(flag)


@pytest.mark.parametrize("flag", ["UF", "UR", "UT", "UPE", "REFUSED"])
@pytest.mark.parametrize("condition", ["5xx", "gateway-error"])
def test_5xx_and_gateway_error_include_connect_failure_and_refused_stream(
    condition: str, flag: str
) -> None:
    # Envoy: 5xx "(Includes connect-failure and refused-stream)".
    assert retry_on(condition).retry_on_error(flag)


def test_connect_failure_and_refused_stream_retry_only_their_own_reason() -> None:
    connect = retry_on("connect-failure")
    assert connect.retry_on_error("UF")
    assert not any(connect.retry_on_error(f) for f in ("UR", "UT", "REFUSED"))
    refused = retry_on("refused-stream")
    assert refused.retry_on_error("REFUSED")
    assert not any(refused.retry_on_error(f) for f in ("UF", "UR", "UT"))


@pytest.mark.parametrize("conditions", ["5xx", "reset", "gateway-error,connect-failure"])
def test_an_overflow_is_never_retried(conditions: str) -> None:
    assert not retry_on(conditions).retry_on_error("UO")


def test_bare_status_codes_retry_those_statuses_only() -> None:
    retry = retry_on("503,504")
    assert retry.retry_on_status(503) and retry.retry_on_status(504)
    assert not retry.retry_on_status(500) and not retry.retry_on_status(502)
    assert not retry.retry_on_error("UF")


def test_retriable_4xx_means_409_and_gateway_error_502_to_504() -> None:
    four = retry_on("retriable-4xx")
    assert four.retry_on_status(409)
    assert not any(four.retry_on_status(s) for s in (400, 404, 429, 503))
    gateway = retry_on("gateway-error")
    assert all(gateway.retry_on_status(s) for s in (502, 503, 504))
    assert not gateway.retry_on_status(500) and not gateway.retry_on_status(501)


def test_retry_back_off_stays_within_envoys_bounds() -> None:
    # Envoy: "the back-off for the retry is in the range [0, (2^N-1)B)", B = 25 ms,
    # capped at ten times B.
    forwarder = TrafficForwarder.__new__(TrafficForwarder)
    forwarder.rnd = random.Random(7)
    for attempt, bound in ((1, 0.025), (2, 0.075), (3, 0.175), (4, 0.25), (9, 0.25)):
        draws = [forwarder._backoff(attempt) for _ in range(400)]
        assert max(draws) <= bound
        # Not a smaller range than Envoy's: some draw comes close to the bound.
        assert max(draws) > bound * 0.9


def test_istio_1_26_retry_fields_set_the_host_predicate_and_the_base_interval() -> None:
    # retryIgnorePreviousHosts (default true) and backoff (Envoy's base interval).
    default = retry_on("5xx")
    assert default.ignore_previous_hosts and default.backoff_s == 0.025
    traffic = compile_route_traffic(
        {"retries": {"attempts": 3, "retryIgnorePreviousHosts": False, "backoff": "100ms"}},
        clusters,
    )
    assert traffic is not None and traffic.retry is not None
    assert not traffic.retry.ignore_previous_hosts
    assert traffic.retry.backoff_s == 0.1
    forwarder = TrafficForwarder.__new__(TrafficForwarder)
    forwarder.rnd = random.Random(3)
    for attempt, bound in ((1, 0.1), (2, 0.3), (5, 1.0)):
        draws = [forwarder._backoff(attempt, traffic.retry.backoff_s) for _ in range(400)]
        assert bound * 0.9 < max(draws) <= bound


def test_istio_1_26_retry_fields_are_accepted_and_backoff_is_checked(tmp_path: Path) -> None:
    (tmp_path / "vs.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: app, namespace: shop}
spec:
  hosts: [app.local]
  http:
    - retries: {attempts: 2, retryIgnorePreviousHosts: false, backoff: 50ms}
      route: [{destination: {host: app.local}}]
    - retries: {attempts: 2, backoff: soon}
      route: [{destination: {host: app.local}}]
"""
    )
    with pytest.raises(ConfigErrors) as refused:
        validate(load_resources([str(tmp_path)]))
    # Only the second route's backoff: the Istio 1.26 fields are known fields.
    assert [e.path for e in refused.value.errors] == ["spec.http[1].retries.backoff"]


# --------------------------------------------------------------------------- outlier


def detector(n: int, policy: OutlierPolicy) -> tuple[OutlierDetector, list[EndpointState]]:
    eps = [EndpointState(Endpoint(f"10.0.0.{i}", 80)) for i in range(n)]
    return OutlierDetector(policy, eps), eps


def outlier_policy(spec: dict) -> OutlierPolicy:
    traffic = compile_cluster_traffic({"outlierDetection": spec}, "HTTP")
    assert traffic is not None and traffic.outlier is not None
    return traffic.outlier


def test_deprecated_consecutive_errors_counts_gateway_errors_only() -> None:
    # Istio maps consecutiveErrors to consecutive_gateway_failure and stops enforcing
    # consecutive_5xx (istio/api#617): 500s never eject, 502/503/504 do.
    policy = outlier_policy({"consecutiveErrors": 2, "maxEjectionPercent": 100})
    assert (policy.consecutive_5xx, policy.consecutive_gateway) == (0, 2)
    det, eps = detector(2, policy)
    for _ in range(10):
        det.record_status(eps[0], 500, 0.0)
    assert eps[0].healthy
    det.record_status(eps[0], 503, 0.0)
    det.record_status(eps[0], 502, 0.0)
    assert not eps[0].healthy


def test_consecutive_5xx_errors_overrides_the_deprecated_field() -> None:
    policy = outlier_policy({"consecutiveErrors": 2, "consecutive5xxErrors": 3})
    assert (policy.consecutive_5xx, policy.consecutive_gateway) == (3, 2)
    assert (outlier_policy({}).consecutive_5xx, outlier_policy({}).consecutive_gateway) == (5, 0)


def test_ejection_time_grows_with_each_ejection_up_to_300_seconds() -> None:
    # The endpoint fails again as soon as it is back, before an interval has passed
    # (which would lower the multiplier).
    policy = outlier_policy(
        {
            "consecutive5xxErrors": 1,
            "baseEjectionTime": "100s",
            "interval": "1h",
            "maxEjectionPercent": 100,
        }
    )
    det, eps = detector(2, policy)
    now = 0.0
    durations = []
    for _ in range(6):
        det.record_status(eps[0], 500, now)
        durations.append(eps[0].ejected_until - now)
        now = eps[0].ejected_until
        det.refresh(now)
        assert eps[0].healthy
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0, 300.0]
    # The multiplier stopped growing (Envoy: while backoff x base < max + base), so a
    # few healthy intervals bring it back down.
    assert eps[0].times_ejected == 4


def test_a_base_ejection_time_over_300_seconds_is_its_own_cap() -> None:
    policy = outlier_policy(
        {"consecutive5xxErrors": 1, "baseEjectionTime": "400s", "maxEjectionPercent": 100}
    )
    det, eps = detector(2, policy)
    det.record_status(eps[0], 500, 0.0)
    det.refresh(400.0)
    det.record_status(eps[0], 500, 400.0)
    assert eps[0].ejected_until == 800.0


# --------------------------------------------------------------------------- balancing


def cluster(lb: dict | None, outlier: dict | None, n: int = 4) -> ClusterState:
    policy: dict = {}
    if lb is not None:
        policy["loadBalancer"] = lb
    if outlier is not None:
        policy["outlierDetection"] = outlier
    endpoints = tuple(Endpoint("127.0.0.1", 9000 + i) for i in range(n))
    return ClusterState(
        Cluster(
            "outbound|80||svc",
            "svc",
            80,
            endpoints=endpoints,
            traffic=compile_cluster_traffic(policy, "HTTP"),
        ),
        None,
    )


def eject(state: ClusterState, *indexes: int) -> None:
    # ClusterState.pick reads time.monotonic(): eject on that clock.
    assert state.detector is not None
    for i in indexes:
        state.detector.record_local_failure(state.endpoints[i], time.monotonic())


def test_without_min_health_percent_an_all_ejected_cluster_has_no_healthy_upstream() -> None:
    from gateway.errors import NoHealthyUpstream

    state = cluster(None, {"consecutive5xxErrors": 1, "maxEjectionPercent": 100}, n=2)
    eject(state, 0, 1)
    with pytest.raises(NoHealthyUpstream):
        state.pick(None, None)


def test_min_health_percent_balances_over_every_endpoint_in_panic() -> None:
    state = cluster(
        {"simple": "ROUND_ROBIN"},
        {"consecutive5xxErrors": 1, "maxEjectionPercent": 100, "minHealthPercent": 50},
    )
    eject(state, 0)
    # 3 of 4 healthy (75 % >= 50 %): the ejected endpoint gets nothing.
    assert state.endpoints[0] not in {state.pick(None, None) for _ in range(8)}
    eject(state, 1, 2)
    # 1 of 4 healthy (25 % < 50 %): panic, all four take requests again.
    assert {state.pick(None, None) for _ in range(8)} == set(state.endpoints)


def test_a_retry_under_consistent_hashing_goes_to_the_keys_endpoint_again() -> None:
    # Istio gives hashed routes no previous-hosts predicate
    # (DefaultConsistentHashPolicy): stickiness holds across retries.
    state = cluster({"consistentHash": {"httpHeaderName": "x-user"}}, None)
    key = hash_key("alice")
    first = state.pick(key, None)
    assert all(state.pick(key, first) is first for _ in range(5))


def test_a_retry_without_hashing_avoids_the_host_that_failed() -> None:
    state = cluster({"simple": "ROUND_ROBIN"}, None)
    first = state.pick(None, None)
    assert all(state.pick(None, first) is not first for _ in range(8))


def test_min_health_percent_is_no_longer_reported_as_not_enforced(tmp_path: Path) -> None:
    (tmp_path / "dr.yaml").write_text(
        """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: app, namespace: shop}
spec:
  host: app.local
  trafficPolicy:
    outlierDetection: {minHealthPercent: 50, consecutiveLocalOriginFailures: 3}
"""
    )
    model = validate(load_resources([str(tmp_path)]))
    flagged = [w.path for w in model.warnings if NOT_ENFORCED in w.message]
    assert flagged == ["spec.trafficPolicy.outlierDetection.consecutiveLocalOriginFailures"]
