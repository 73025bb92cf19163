"""The benchmark scripts stay runnable: each imports (a renamed helper breaks gpu_check's
import of alexnet_cpu, say), and the CPU ones run end to end at a tiny size (slow tier)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest

from tests.paths import ROOT

SCRIPTS = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py") if p.stem != "__init__")
SMALL = {
    "alexnet_cpu": ["--batch", "1", "--repeats", "1", "--threads", "1"],
    "data_throughput": ["--records", "12", "--batches", "1", "--batch", "4", "--repeats", "1"],
    "pycaffe_path": ["--model", "lenet", "--batch", "2", "--rounds", "1"],
    "train_alexnet": ["--batch", "1", "--rounds", "1", "--iters", "1"],
    "small_nets": ["--nets", "logreg", "--rounds", "1", "--iters", "5"],
    "inference_vs_opencv": ["--nets", "alexnet", "--batches", "1", "--rounds", "1"],
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_imports(name):
    assert callable(importlib.import_module(f"benchmarks.{name}").main)


@pytest.mark.subprocess
@pytest.mark.parametrize("name", sorted(SMALL))
def test_benchmarks_run_at_a_tiny_size(name):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, f"benchmarks/{name}.py", *SMALL[name]], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ratio" in done.stdout or "images/s" in done.stdout


@pytest.mark.subprocess
def test_the_brewing_logreg_script_runs_under_our_caffe(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "benchmarks/scripts/brewing_logreg.py", str(tmp_path),
                           "300"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    accuracies = [float(line.split()[-1]) for line in done.stdout.splitlines()]
    assert len(accuracies) == 2 and min(accuracies) > 0.8  # a separable problem, learnt
