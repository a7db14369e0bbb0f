"""Shared pytest options and fixtures.

``--update-golden`` makes golden tests rewrite their ``.out.yaml`` files from what
the code produces now, instead of comparing; review the diff before committing.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="rewrite golden .out.yaml files instead of comparing against them",
    )


@pytest.fixture
def update_golden(request: pytest.FixtureRequest) -> bool:
    """True when the run was started with ``--update-golden``."""
    return bool(request.config.getoption("--update-golden"))


def pytest_configure(config: pytest.Config) -> None:
    """pytest-benchmark's timing is off unless ``--benchmark-enable`` is given
    (``make microbench`` gives it): under ``make test`` each micro-benchmark runs
    its body once, as a plain test, and no figure depends on the machine's load."""
    if config.pluginmanager.hasplugin("benchmark"):
        config.option.benchmark_disable = True
