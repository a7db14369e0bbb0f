"""Golden cases for configuration loading: ``tests/golden/config/<case>.in.yaml`` (or a
``<case>.in`` directory) in, ``<case>.out.yaml`` out.

The output of a valid case lists every resource as meshgate understood it (spec in
YAML spelling, defaults left out) and every warning; an invalid case lists the exact
error and warning lines and the summary. A case whose name contains ``invalid`` must
fail validation, any other must pass. ``pytest --update-golden`` rewrites the
``.out.yaml`` files; review the diff.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
import yaml

from gateway.config import ConfigErrors, load_config
from gateway.config.parse import spec_to_data

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "config"


class _Lines(str):
    """Problem lines, dumped as a literal block: one message per line, unquoted."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Lines, lambda d, data: d.represent_scalar("tag:yaml.org,2002:str", data, style="|")
)


def _lines(problems: Iterable[object]) -> _Lines | list[str]:
    text = "".join(f"{p}\n" for p in problems)
    return _Lines(text) if text else []


def _cases() -> list[str]:
    names = set()
    for entry in GOLDEN.iterdir():
        if entry.name.endswith(".in.yaml"):
            names.add(entry.name.removesuffix(".in.yaml"))
        elif entry.name.endswith(".in") and entry.is_dir():
            names.add(entry.name.removesuffix(".in"))
    return sorted(names)


def _input_of(case: str) -> str:
    """The path handed to load_config, relative to the golden directory."""
    return f"{case}.in" if (GOLDEN / f"{case}.in").is_dir() else f"{case}.in.yaml"


def _render(case: str) -> tuple[bool, str]:
    try:
        model = load_config([_input_of(case)])
    except ConfigErrors as exc:
        data: dict[str, object] = {
            "errors": _lines(exc.errors),
            "warnings": _lines(exc.warnings),
            "summary": exc.summary(),
        }
        valid = False
    else:
        data = {
            "resources": [
                {
                    "resource": r.key,
                    "apiVersion": r.api_version,
                    "source": r.source,
                    "spec": spec_to_data(r.spec),
                }
                for r in model.resources
            ],
            "warnings": _lines(model.warnings),
        }
        valid = True
    text = yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=1000, allow_unicode=True)
    return valid, text


@pytest.mark.parametrize("case", _cases())
def test_golden_config_case_produces_its_recorded_output(
    case: str, update_golden: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Sources print as the path given, so run from the golden directory to keep
    # the recorded file:line stable wherever the repository lives.
    monkeypatch.chdir(GOLDEN)
    valid, actual = _render(case)
    expected_valid = "invalid" not in case
    assert valid == expected_valid, (
        f"{case}: expected {'no errors' if expected_valid else 'errors'}, got:\n{actual}"
    )
    out = GOLDEN / f"{case}.out.yaml"
    if update_golden:
        out.write_text(actual, encoding="utf-8")
        return
    assert out.exists(), f"{out.name} is missing; run pytest --update-golden and review it"
    assert actual == out.read_text(encoding="utf-8")


def test_golden_config_directory_has_cases_for_every_output() -> None:
    cases = set(_cases())
    stale = sorted(
        p.name for p in GOLDEN.glob("*.out.yaml") if p.name[: -len(".out.yaml")] not in cases
    )
    assert len(cases) >= 10
    assert stale == []
