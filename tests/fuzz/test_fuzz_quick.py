"""The quick fuzz subset CI runs on every change (seed fixed; the full run with other seeds is
scripts/fuzz.py). Each case must end in one clean error line or a success where the input may
still be valid: never a traceback, a crash, a hang, or a damaged existing file."""

from __future__ import annotations

import pytest

from tests.fuzz.cases import generate, run_case

SEED = 20261201
# in-process families get many cases; those run in a subprocess (they may crash or exhaust
# memory) fewer, to keep the subset under two minutes on two cores
QUICK = {"prototxt": 150, "solver": 40, "caffemodel": 40, "torch-weights": 10,
         "hdf5-weights": 6, "lmdb": 10, "images": 21, "faults": 1}  # fmt: skip
CASES = [
    pytest.param(case, marks=[pytest.mark.subprocess] if case.isolate else [])
    for case in generate(SEED, QUICK)
]
pytestmark = pytest.mark.slow  # a few hundred cases: CI runs them, the fast tier does not


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.family}/{c.name}")
def test_fuzz_case(case, tmp_path):
    outcome, allowed = run_case(case, tmp_path)
    assert allowed, f"{case.family}/{case.name} (seed {SEED}): {outcome.kind}: {outcome.detail}"
    assert not (tmp_path / "pwned.txt").exists()  # nothing executed from a weights file
