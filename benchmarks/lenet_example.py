"""The LeNet example's training time (examples/fashion_mnist/quickstart.sh lenet), measured on a
few hundred iterations and extrapolated to the whole run rather than run whole.

The solver is examples/fashion_mnist/lenet_solver.prototxt (Caffe's lenet_solver settings:
10,000 iterations of batch 64, a test pass of 100 x 100 images every 500), its Data layers
reading the LMDBs that quickstart.sh makes (``caffe-alex convert-mnist``; give their folder).
Printed: ms per training iteration (median of the timed chunks, after a warm-up), seconds per
test pass, the run extrapolated (10,000 iterations + 20 test passes + the last one), and the
test accuracy reached after the iterations run (not the whole run's).

    python benchmarks/lenet_example.py LMDB_FOLDER [--iters 300] [--chunk 50]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import caffe_alex  # noqa: E402, F401, I001  (first: it sets GOMP_SPINCOUNT before torch loads)
import torch  # noqa: E402

from caffe_alex.formats.prototxt import read_net, read_solver  # noqa: E402
from caffe_alex.log import get_logger  # noqa: E402
from caffe_alex.solvers import Solver  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist"


def solver_param(lmdbs: Path):
    param = read_solver(str(EXAMPLE / "lenet_solver.prototxt"))
    net, _ = read_net(str(EXAMPLE / "lenet_train_test.prototxt"))
    for layer in net.layer:
        if layer.type == "Data":
            name = "fashion_train_lmdb" if layer.include[0].phase == 0 else "fashion_test_lmdb"
            layer.data_param.source = str(lmdbs / name)
    param.ClearField("net")
    param.net_param.CopyFrom(net)
    param.test_interval, param.test_initialization = 10**9, False  # tests timed apart
    param.display, param.snapshot = 0, 0
    param.snapshot_after_train = False
    param.solver_mode = param.CPU
    param.random_seed = 1
    return param


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lmdbs", help="the folder holding fashion_train_lmdb, fashion_test_lmdb")
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=50, help="iterations per timed chunk")
    args = parser.parse_args(argv)
    get_logger().setLevel("WARNING")
    full = read_solver(str(EXAMPLE / "lenet_solver.prototxt"))
    solver = Solver(solver_param(Path(args.lmdbs)))
    load = os.getloadavg()
    solver.step(20)  # warm-up: the feed, the allocator, oneDNN's kernels
    chunks = []
    for _ in range(max(1, (args.iters - 20) // args.chunk)):
        began = time.perf_counter()
        solver.step(args.chunk)
        chunks.append((time.perf_counter() - began) / args.chunk)
    began = time.perf_counter()
    scores = solver.test(0)
    test_s = time.perf_counter() - began
    solver.close()
    per_iter = statistics.median(chunks)
    tests = full.max_iter // full.test_interval + 1  # every 500 and the last one
    total = full.max_iter * per_iter + tests * test_s
    print(f"LeNet (Fashion-MNIST, batch 64, {torch.get_num_threads()} threads, load "
          f"{load[0]:.2f} -> {os.getloadavg()[0]:.2f}):")  # fmt: skip
    print(f"  training: {per_iter * 1e3:.1f} ms/iteration (median of {len(chunks)} chunks of "
          f"{args.chunk}; all: {', '.join(f'{c * 1e3:.1f}' for c in chunks)})")  # fmt: skip
    print(f"  test pass ({full.test_iter[0]} batches): {test_s:.2f} s")
    print(f"  extrapolated run ({full.max_iter} iterations + {tests} test passes): "
          f"{total:.0f} s = {total / 60:.1f} min (from {solver.iter} iterations)")  # fmt: skip
    print(f"  accuracy after {solver.iter} iterations: {scores.get('accuracy')}")
    return {"ms_per_iter": per_iter * 1e3, "test_s": test_s, "total_s": total}


if __name__ == "__main__":
    main()
