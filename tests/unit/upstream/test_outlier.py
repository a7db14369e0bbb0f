"""Outlier ejection: thresholds, the max-ejection share, ejection time growing with
each ejection, and endpoints coming back."""

from __future__ import annotations

from gateway.policy import OutlierPolicy
from gateway.routing.table import Endpoint
from gateway.upstream.outlier import EndpointState, OutlierDetector


def setup(n: int, **kw: object) -> tuple[OutlierDetector, list[EndpointState]]:
    eps = [EndpointState(Endpoint(f"10.0.0.{i}", 80)) for i in range(n)]
    return OutlierDetector(OutlierPolicy(**kw), eps), eps  # type: ignore[arg-type]


def test_consecutive_5xx_ejects_at_the_threshold_and_a_success_resets_the_count() -> None:
    det, eps = setup(2, consecutive_5xx=3, max_ejection_percent=100)
    det.record_status(eps[0], 500, 0.0)
    det.record_status(eps[0], 500, 0.0)
    det.record_status(eps[0], 200, 0.0)
    det.record_status(eps[0], 500, 0.0)
    det.record_status(eps[0], 500, 0.0)
    assert eps[0].healthy
    det.record_status(eps[0], 503, 1.0)
    assert not eps[0].healthy
    assert eps[0].ejected_until == 31.0


def test_gateway_errors_count_only_502_503_504_and_local_failures() -> None:
    det, eps = setup(2, consecutive_5xx=0, consecutive_gateway=2, max_ejection_percent=100)
    det.record_status(eps[0], 500, 0.0)
    det.record_status(eps[0], 500, 0.0)
    assert eps[0].healthy
    det.record_status(eps[0], 502, 0.0)
    det.record_local_failure(eps[0], 0.0)
    assert not eps[0].healthy


def test_first_ejection_always_happens_then_the_percentage_caps_more() -> None:
    det, eps = setup(4, consecutive_5xx=1, max_ejection_percent=10)
    det.record_status(eps[0], 500, 0.0)
    det.record_status(eps[1], 500, 0.0)
    assert [e.healthy for e in eps] == [False, True, True, True]


def test_ejected_endpoint_returns_after_base_time_times_ejections() -> None:
    det, eps = setup(
        2, consecutive_5xx=1, base_ejection_s=10.0, interval_s=1000.0, max_ejection_percent=100
    )
    det.record_status(eps[0], 500, 0.0)
    det.refresh(9.9)
    assert not eps[0].healthy
    det.refresh(10.0)
    assert eps[0].healthy and eps[0].ejected_until == 0.0
    det.record_status(eps[0], 500, 11.0)
    assert eps[0].ejected_until == 31.0  # second ejection: twice the base time
    version = det.version
    det.refresh(31.0)
    assert eps[0].healthy and det.version == version + 1
