"""Shared test set-up, and the markers that pick a tier of the suite.

- ``gpu``: needs a CUDA device; skipped where there is none.
- ``corpus``: reads ../shared/corpus (CAFFE_ALEX_CORPUS elsewhere); skipped where it is absent,
  except on CI, where its absence is an error.
- ``subprocess``: starts a program (the command line in a fresh Python, ranks, a writer killed
  midway): seconds each, for the interpreter and torch to start. A test that starts Python,
  bash or torchrun without this marker fails, so the fast tier stays fast as tests are added.
- ``slow``: left out of the fast tier, ``bash scripts/test.sh -m "not slow"``; every
  ``corpus`` and ``subprocess`` test is ``slow`` too, and so is every test of the whole
  AlexNet's weights (fixture ``alexnet``), every test whose name says it compiles
  (torch.compile), every test in the browser (fixture ``browser``: Chromium), the fuzz suite,
  and the tests marked one by one that each take a quarter of a second or more (whole fork
  nets, ONNX Runtime): the fast tier runs in about half a minute on two cores. CI runs
  everything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Programs whose start costs seconds: a test that runs one must say so (marker subprocess).
_COSTLY_PROGRAMS = {"python", "python3", "bash", "sh", "torchrun"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every Net shares Net.forward's code object, so compiled nets of many tests would add up
    to dynamo's recompile limit; each test starts from an empty compile cache instead."""
    yield
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset()


def _program(args) -> str:
    first = args if isinstance(args, (str, bytes, os.PathLike)) else args[0]
    name = Path(os.fsdecode(first)).name
    return "python" if Path(os.fsdecode(first)) == Path(sys.executable) else name


@pytest.fixture(autouse=True)
def _subprocess_marker_is_honest(request, monkeypatch):
    """Fails a test that starts a costly program without the ``subprocess`` marker."""
    if request.node.get_closest_marker("subprocess") is not None:
        yield
        return
    original = subprocess.Popen.__init__

    def guarded(self, args, *rest, **kwargs):
        program = _program(args)
        if program in _COSTLY_PROGRAMS or program.startswith("python"):
            raise AssertionError(
                f"{request.node.nodeid} starts {program!r}: mark it @pytest.mark.subprocess"
            )
        original(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


def pytest_configure(config):
    # On CI the corpus must be there: its tests would otherwise skip and pass vacuously.
    from tests.corpus import CORPUS

    if os.environ.get("CI") and not (CORPUS / "SOURCES.md").is_file():
        raise pytest.UsageError(f"CI: the test corpus {CORPUS} is missing")


def pytest_collection_modifyitems(config, items):
    import torch

    from tests.corpus import CORPUS

    no_cuda = pytest.mark.skip(reason="needs a CUDA device")
    no_corpus = pytest.mark.skip(reason=f"the corpus {CORPUS} is not present")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(no_cuda)
        if item.get_closest_marker("corpus") is not None and not CORPUS.is_dir():
            item.add_marker(no_corpus)
        if item.get_closest_marker("corpus") or item.get_closest_marker("subprocess"):
            item.add_marker(pytest.mark.slow)
        fixtures = getattr(item, "fixturenames", ())
        if "alexnet" in fixtures:  # a 233 MB AlexNet weights file
            item.add_marker(pytest.mark.slow)
        if "browser" in fixtures:  # headless Chromium: seconds to start, and each page loads
            item.add_marker(pytest.mark.slow)
        if "compile" in item.name:  # torch.compile: a second or two each, 30 such tests
            item.add_marker(pytest.mark.slow)
