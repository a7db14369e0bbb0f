"""Golden cases: ``<case>.in.yaml`` -> load -> compile -> ``<case>.out.yaml``.

The output is the Snapshot dump (``snapshot_to_dict``) for a gateway labelled
``istio=ingressgateway``, with every origin's ``file:line`` relative to this folder.
A new case is a new ``.in.yaml``; run ``pytest --update-golden`` to write its
``.out.yaml``, then read the diff before committing it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config.load import load_config
from gateway.routing import compile_snapshot, snapshot_to_dict

HERE = Path(__file__).parent
CASES = sorted(p.name.removesuffix(".in.yaml") for p in HERE.glob("*.in.yaml"))
LABELS = {"istio": "ingressgateway"}


def _render(case: str) -> str:
    model = load_config([f"{case}.in.yaml"])
    snapshot = compile_snapshot(model, LABELS)
    return yaml.safe_dump(snapshot_to_dict(snapshot), sort_keys=False, allow_unicode=True)


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 5, CASES


@pytest.mark.parametrize("case", CASES)
def test_compiled_snapshot_matches_golden(
    case: str, update_golden: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Relative paths keep the dumped sources ("case.in.yaml:12") machine-independent.
    monkeypatch.chdir(HERE)
    actual = _render(case)
    expected_path = HERE / f"{case}.out.yaml"
    if update_golden:
        expected_path.write_text(actual, encoding="utf-8")
        return
    if not expected_path.exists():
        pytest.fail(f"{expected_path.name} missing; run pytest --update-golden and review it")
    assert actual == expected_path.read_text(encoding="utf-8")
