"""caffe-alex against a real BVLC Caffe build, on the same machine, alternated in one run.

Each case runs Caffe's own program and caffe-alex's on the same files (prototxt, solver, LMDB,
HDF5), whole processes, start-up included; a per-iteration figure is the difference of two
runs of different lengths divided by the difference of their iterations (start-up, net
building and data opening cancel out). Cases:

- ``logreg``: BVLC's brewing-logreg net (HDF5Data 10,000 x 4, batch 10, InnerProduct,
  Accuracy, SoftmaxWithLoss) with the notebook's solver: ``caffe train`` against
  ``caffe-alex train``, per-iteration cost (runs of 1,000 and 1,000 + ``--logreg-iters``);
- ``lenet``: the LeNet example (examples/fashion_mnist/lenet_solver.prototxt: batch 64,
  10,000 iterations, a test pass every 500) on Fashion-MNIST LMDBs made here with
  ``caffe-alex convert-mnist``: whole run's wall time and final test accuracy of each side
  (``--lenet-iters`` shortens it);
- ``alexnet32`` / ``alexnet256``: the quickstart's AlexNet (227 x 227 Fashion-MNIST LMDB,
  examples/fashion_mnist/alexnet_train_test.prototxt, made by quickstart.sh) at batch 32 and
  256, per training iteration (forward, backward, SGD update), no test passes;
- ``pycaffe-logreg``: the brewing-logreg notebook as a script (benchmarks/scripts/
  brewing_logreg.py: NetSpec, HDF5 files, ``solver.solve()`` of 10,000 iterations, twice as the
  notebook does) under real pycaffe and under caffe-alex's ``caffe`` package: whole-script wall
  time.

Caffe is found with ``--caffe`` (its ``caffe`` program); pycaffe with ``--pycaffe-python``
(an interpreter that can ``import caffe``, e.g. a venv with PYTHONPATH set by
``--pycaffe-path``). Threads: both sides keep their defaults (Caffe: OpenBLAS's, all cores;
caffe-alex: its thread policy).

    python benchmarks/vs_caffe.py --caffe /path/to/build/tools/caffe \
        [--pycaffe-python PY --pycaffe-path DIR] [--cases logreg,lenet,alexnet32,...]
        [--rounds 3] [--lenet-iters 10000] [--logreg-iters 10000] [--train-args=--compile]
        [--baseline DIR]

``--baseline DIR`` times another caffe-alex checkout (``git worktree add DIR <commit>``) as a
third side in the same alternation: a change against the code before it, measured beside Caffe
in one run.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from google.protobuf import text_format  # noqa: E402

from benchmarks.small_nets import LOGREG_NET, NOTEBOOK_SOLVER, logreg_data  # noqa: E402
from caffe_alex.formats.prototxt import read_net, read_solver  # noqa: E402
from caffe_alex.proto import caffe_pb2  # noqa: E402

EXAMPLE = ROOT / "examples" / "fashion_mnist"
FASHION = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
ACCURACY = re.compile(r"Test net output #\d+: accuracy = ([0-9.eE+-]+)")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


class Sides:
    """How to run each side's training program and pycaffe scripts."""

    def __init__(self, args):
        for flag, program in (("--caffe", args.caffe), ("--pycaffe-python", args.pycaffe_python)):
            if program and not os.access(program, os.X_OK):
                raise SystemExit(f"{flag} {program}: no such program")
        self.caffe = args.caffe
        self.pycaffe_python, self.pycaffe_path = args.pycaffe_python, args.pycaffe_path
        self.train_args = args.train_args.split()
        # caffe-alex's checkouts by side: this one, and the baseline's where given
        self.roots = {"caffe-alex": ROOT}
        if args.baseline:
            if not (Path(args.baseline) / "caffe_alex").is_dir():
                raise SystemExit(f"--baseline {args.baseline}: no caffe_alex package there")
            self.roots["baseline"] = Path(args.baseline).resolve()
        self.names = ["Caffe", *self.roots]

    def train(self, side: str, solver: Path) -> tuple[float, str]:
        """(wall seconds, log text) of one training run."""
        if side == "Caffe":
            command = [self.caffe, "train", f"-solver={solver}"]
            env = {**os.environ, "GLOG_logtostderr": "1"}
        else:
            command = [sys.executable, "-m", "caffe_alex", "train", "--solver", str(solver),
                       *self.train_args]  # fmt: skip
            env = {**os.environ, "PYTHONPATH": str(self.roots[side])}
        began = time.perf_counter()
        done = subprocess.run(command, env=env, cwd=solver.parent, capture_output=True, text=True)
        seconds = time.perf_counter() - began
        if done.returncode:
            raise SystemExit(f"{side} failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        return seconds, done.stdout + done.stderr

    def script(self, side: str, script: Path, folder: Path) -> float:
        if side == "Caffe":
            python, path = self.pycaffe_python, self.pycaffe_path or ""
        else:
            python, path = sys.executable, str(self.roots[side])
        env = {**os.environ, "PYTHONPATH": path, "GLOG_minloglevel": "2"}
        began = time.perf_counter()
        done = subprocess.run([python, str(script), str(folder)], env=env, capture_output=True,
                              text=True)  # fmt: skip
        seconds = time.perf_counter() - began
        if done.returncode:
            raise SystemExit(f"{side}: {script.name} failed:\n{done.stderr[-3000:]}")
        return seconds


def write_solver(folder: Path, name: str, solver, net, **fields) -> Path:
    """A solver file naming its net by path (the net written beside it), CPU mode, no
    snapshot after training, and ``fields`` set."""
    net_path = folder / f"{name}_net.prototxt"
    net_path.write_text(text_format.MessageToString(net))
    solver = type(solver).FromString(solver.SerializeToString())
    solver.ClearField("net_param")
    solver.net = str(net_path)
    solver.snapshot_prefix = str(folder / name)
    solver.snapshot_after_train = False
    solver.solver_mode = caffe_pb2.SolverParameter.CPU
    for key, value in fields.items():
        setattr(solver, key, value)
    path = folder / f"{name}_solver.prototxt"
    path.write_text(text_format.MessageToString(solver))
    return path


def per_iteration(sides: Sides, make, short: int, long: int, rounds: int) -> dict[str, float]:
    """Seconds per iteration of each side: (long run - short run) / (long - short), medians of
    ``rounds`` alternated pairs. ``make(max_iter)`` writes the solver file."""
    solvers = {n: make(n) for n in (short, long)}
    times = {side: {short: [], long: []} for side in sides.names}
    for _ in range(rounds):
        for n in (short, long):
            for side in times:
                times[side][n].append(sides.train(side, solvers[n])[0])
    return {side: (statistics.median(t[long]) - statistics.median(t[short])) / (long - short)
            for side, t in times.items()}  # fmt: skip


def case_logreg(sides: Sides, folder: Path, args) -> None:
    _, _, listing = logreg_data(folder)
    net = text_format.Parse(LOGREG_NET % listing, caffe_pb2.NetParameter())
    solver = text_format.Parse(NOTEBOOK_SOLVER, caffe_pb2.SolverParameter())
    cost = per_iteration(
        sides,
        lambda n: write_solver(folder, f"logreg{n}", solver, net, max_iter=n),
        1000,
        1000 + args.logreg_iters,
        args.rounds,
    )
    _report("logreg, per training iteration", cost, "ms", 1e3)


def case_alexnet(sides: Sides, folder: Path, args, batch: int) -> None:
    lmdb = EXAMPLE / "fashion_train_227_lmdb"
    if not (lmdb / "data.mdb").is_file():
        raise SystemExit(f"{lmdb} is missing: run examples/fashion_mnist/quickstart.sh first")
    net, _ = read_net(str(EXAMPLE / "alexnet_train_test.prototxt"))
    for layer in net.layer:
        if layer.type == "Data":
            layer.data_param.batch_size = batch
            layer.data_param.source = str(ROOT / layer.data_param.source)
            if layer.transform_param.mean_file:
                layer.transform_param.mean_file = str(ROOT / layer.transform_param.mean_file)
    solver = read_solver(str(EXAMPLE / "alexnet_solver.prototxt"))
    # from the third iteration on: the first two grow the heap that later ones reuse (memory.py)
    short, long = (2, 6) if batch <= 64 else (2, 5)
    cost = per_iteration(
        sides,
        lambda n: write_solver(folder, f"alexnet{batch}_{n}", solver, net, max_iter=n,
                               test_interval=10**8, test_initialization=False, display=0),
        short, long, args.rounds)  # fmt: skip
    _report(f"AlexNet (quickstart net) batch {batch}, per training iteration", cost, "s", 1)


def case_lenet(sides: Sides, folder: Path, args) -> None:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        raise SystemExit(f"Fashion-MNIST is not in {FASHION}: apt-get install "
                         "dataset-fashion-mnist, or set FASHION_MNIST_DIR")  # fmt: skip
    for part, name in (("train", "fashion_train_lmdb"), ("t10k", "fashion_test_lmdb")):
        subprocess.run([sys.executable, "-m", "caffe_alex", "convert-mnist",
                        str(FASHION / f"{part}-images-idx3-ubyte.gz"),
                        str(FASHION / f"{part}-labels-idx1-ubyte.gz"), str(folder / name)],
                       check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    net, _ = read_net(str(EXAMPLE / "lenet_train_test.prototxt"))
    for layer in net.layer:
        if layer.type == "Data":
            test = layer.include and layer.include[0].phase == caffe_pb2.TEST
            layer.data_param.source = str(folder / ("fashion_test_lmdb" if test else
                                                    "fashion_train_lmdb"))  # fmt: skip
    solver = read_solver(str(EXAMPLE / "lenet_solver.prototxt"))
    path = write_solver(folder, "lenet", solver, net, max_iter=args.lenet_iters)
    results = {}
    for side in sides.names:  # one whole run each: minutes
        seconds, log = sides.train(side, path)
        results[side] = (seconds, ACCURACY.findall(log))
    print(f"LeNet example ({args.lenet_iters} iterations, batch 64, a test every 500; {load()}):")
    for side, (seconds, accuracies) in results.items():
        print(f"  {side:10s} {seconds:7.1f} s, final test accuracy "
              f"{accuracies[-1] if accuracies else '?'}")  # fmt: skip
    for side in sides.names[1:]:
        print(f"  ratio {side} / Caffe: {results[side][0] / results['Caffe'][0]:.2f}")


def case_pycaffe_logreg(sides: Sides, folder: Path, args) -> None:
    if not sides.pycaffe_python:
        print("pycaffe-logreg: skipped (no --pycaffe-python)")
        return
    script = ROOT / "benchmarks" / "scripts" / "brewing_logreg.py"
    times = {side: [] for side in sides.names}
    for _ in range(args.rounds):
        for side in times:
            times[side].append(sides.script(side, script, folder))
    _report(
        "brewing-logreg notebook as a script (2 x 10,000 iterations, whole script)",
        {side: statistics.median(t) for side, t in times.items()},
        "s",
        1,
    )


def _report(title: str, cost: dict[str, float], unit: str, scale: float) -> None:
    print(f"{title} ({load()}):")
    for side, value in cost.items():
        print(f"  {side:10s} {value * scale:10.4f} {unit}")
    for side in cost:
        if side != "Caffe":
            print(f"  ratio {side} / Caffe: {cost[side] / cost['Caffe']:.2f}", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caffe", required=True, help="Caffe's caffe program")
    parser.add_argument("--pycaffe-python", help="a Python that imports real pycaffe")
    parser.add_argument("--pycaffe-path", help="PYTHONPATH for it (Caffe's python/ folder)")
    parser.add_argument("--cases", default="logreg,pycaffe-logreg,alexnet32,lenet")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lenet-iters", type=int, default=10000)
    parser.add_argument("--logreg-iters", type=int, default=10000, help="iterations between "
                        "logreg's short and long runs (more: less start-up noise)")  # fmt: skip
    parser.add_argument(
        "--train-args",
        default="",
        help="more options for caffe-alex train: --train-args=--channels-last",
    )
    parser.add_argument("--baseline", help="another caffe-alex checkout, timed as a third side")
    args = parser.parse_args(argv)
    sides = Sides(args)
    cases = {
        "logreg": case_logreg,
        "pycaffe-logreg": case_pycaffe_logreg,
        "alexnet32": lambda s, f, a: case_alexnet(s, f, a, 32),
        "alexnet256": lambda s, f, a: case_alexnet(s, f, a, 256),
        "lenet": case_lenet,
    }
    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory() as folder:
            cases[name](sides, Path(folder), args)


if __name__ == "__main__":
    main()
