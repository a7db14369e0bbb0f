import pytest

from gateway.config import DurationError, parse_duration_s


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("100ms", 0.1),
        ("1.5s", 1.5),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("2m0.5s", 120.5),
        ("1000us", 0.001),
        ("1000000ns", 0.001),
        (".25s", 0.25),
    ],
)
def test_istio_durations_parse_to_seconds(text: str, seconds: float) -> None:
    assert parse_duration_s(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "is not a duration"),
        ("5", "is not a duration"),
        ("1 s", "is not a duration"),
        ("-1s", "is not a duration"),
        ("1d", "is not a duration"),
        ("1.5ms", "finer than a millisecond"),
        ("999us", "finer than a millisecond"),
        ("0s", "shorter than the minimum of 1ms"),
    ],
)
def test_durations_istio_refuses_are_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(DurationError, match=reason):
        parse_duration_s(text)


def test_minimum_can_be_lowered_to_accept_zero() -> None:
    assert parse_duration_s("0s", minimum_ms=0) == 0.0
