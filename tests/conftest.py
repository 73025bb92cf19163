"""Shared test set-up."""

from __future__ import annotations

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
