import pytest

from gateway.cli import parse_labels


def test_labels_parse_into_a_dict() -> None:
    assert parse_labels("istio=ingressgateway, app=edge") == {
        "istio": "ingressgateway",
        "app": "edge",
    }


def test_label_without_equals_is_refused() -> None:
    with pytest.raises(ValueError, match="key=value"):
        parse_labels("istio")
