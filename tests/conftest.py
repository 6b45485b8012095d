"""Test options shared by every test file.

``@pytest.mark.slow`` marks end-to-end checks that take minutes on 2 cores (benchmark-sized runs).
They are skipped by the default run (the README's test command, kept near 5 minutes) and run with
``pytest --runslow`` or ``POLYTASK_SLOW=1``.
"""

from __future__ import annotations

import os

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: minutes-long end-to-end check, run with --runslow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow") or os.environ.get("POLYTASK_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow or POLYTASK_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
