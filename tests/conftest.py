"""Shared test set-up."""

from __future__ import annotations

import os
import sys

import pytest


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every Net shares Net.forward's code object, so compiled nets of many tests would add up
    to dynamo's recompile limit; each test starts from an empty compile cache instead."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def pytest_configure(config):
    # On CI the corpus must be there: its tests would otherwise skip and pass vacuously.
    from tests.corpus import CORPUS

    if os.environ.get("CI") and not (CORPUS / "SOURCES.md").is_file():
        raise pytest.UsageError(f"CI: the test corpus {CORPUS} is missing")
