"""Golden cases for Gateway API status: ``<case>.in.yaml`` -> load -> bind ->
``<case>.out.yaml``.

The output is what ``meshgate status`` prints for ``--gateway-class meshgate``: the
conditions of every GatewayClass, Gateway, listener and route meshgate serves, then
the warnings ``meshgate validate`` derives from them. ``pytest --update-golden``
rewrites the ``.out.yaml`` files; review the diff.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config.gatewayapi_status import bind_gateway_api, status_to_dict, status_warnings
from gateway.config.load import load_config

HERE = Path(__file__).parent
CASES = sorted(p.name.removesuffix(".in.yaml") for p in HERE.glob("*.in.yaml"))


def _render(case: str) -> str:
    model = load_config([f"{case}.in.yaml"])
    binding = bind_gateway_api(model, ("meshgate",))
    data = status_to_dict(binding)
    data["warnings"] = [str(w) for w in status_warnings(binding)]
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=200)


def test_there_are_status_cases() -> None:
    assert len(CASES) >= 2, CASES


@pytest.mark.parametrize("case", CASES)
def test_gateway_api_status_matches_golden(
    case: str, update_golden: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(HERE)
    actual = _render(case)
    expected_path = HERE / f"{case}.out.yaml"
    if update_golden:
        expected_path.write_text(actual, encoding="utf-8")
        return
    if not expected_path.exists():
        pytest.fail(f"{expected_path.name} missing; run pytest --update-golden and review it")
    assert actual == expected_path.read_text(encoding="utf-8")
