"""A seeded run repeats exactly on the same machine: two fresh processes training the same
solver file (a small conv net over an LMDB, random crops and mirrors, dropout, fillers drawn
from the seed) log the same losses and accuracies to the last digit and write the same weights,
also with data worker processes. This is what the quickstart's "seeded" figures rest on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from caffe_alex.data.datum import array_to_datum
from tests.data.test_sources import write_db
from tests.paths import ROOT


def _problem(root, mode="CPU"):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 3, 12, 12)).astype(np.uint8)
    labels = rng.integers(0, 4, 48)
    records = [array_to_datum(a, int(k)).SerializeToString() for a, k in zip(images, labels)]
    db = write_db(root / "train_lmdb", "lmdb", records)
    data = textwrap.dedent("""\
        layer {{ name: "d" type: "Data" top: "data" top: "label" include {{ phase: {phase} }}
          transform_param {{ crop_size: 10 mirror: {mirror} scale: 0.0039 mean_value: 120 }}
          data_param {{ source: "{db}" backend: LMDB batch_size: 8 }} }}
        """)
    net = root / "net.prototxt"
    net.write_text(
        data.format(phase="TRAIN", mirror="true", db=db)
        + data.format(phase="TEST", mirror="false", db=db)
        + textwrap.dedent("""\
        layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
          convolution_param { num_output: 6 kernel_size: 3 weight_filler { type: "xavier" } } }
        layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
        layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool"
          pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "drop" type: "Dropout" bottom: "pool" top: "pool"
          dropout_param { dropout_ratio: 0.5 } }
        layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
          inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 0.1 } } }
        layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
          include { phase: TEST } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
        """)
    )
    solver = root / "solver.prototxt"
    solver.write_text(
        f'net: "{net}"\ntest_iter: 2\ntest_interval: 4\nbase_lr: 0.05\nmomentum: 0.9\n'
        'lr_policy: "fixed"\ndisplay: 1\nmax_iter: 8\nsnapshot: 0\n'
        f'snapshot_prefix: "{root / "run"}"\nrandom_seed: 7\nsolver_mode: {mode}\n'
    )
    return solver


def _train(solver, workers: int) -> tuple[list[str], bytes]:
    code = (
        "import sys; from caffe_alex.log import setup_logging; setup_logging(); "
        "from caffe_alex.solvers import Solver; "
        f"s = Solver.from_file(sys.argv[1], feed_options={{'workers': {workers}}}); "
        "s.solve(); s.close()"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", code, str(solver)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # every "loss = x" / "acc = x" of the log, with its iteration (not the times and speeds)
    numbers = re.findall(r"(Iteration \d+|(?:loss|acc) = \S+)", done.stderr)
    weights = (solver.parent / "run_iter_8.caffemodel").read_bytes()
    return numbers, weights


@pytest.mark.subprocess
@pytest.mark.parametrize("mode", ["CPU", pytest.param("GPU", marks=pytest.mark.gpu)])
def test_two_seeded_runs_give_the_same_numbers(tmp_path, mode):
    solver = _problem(tmp_path, mode)
    first, weights = _train(solver, workers=0)
    assert sum(n.startswith("loss") for n in first) >= 20  # 9 displays, 8 outputs, 3 tests
    assert _train(solver, workers=0) == (first, weights)
    assert _train(solver, workers=2) == (first, weights)  # worker processes make the same batches
