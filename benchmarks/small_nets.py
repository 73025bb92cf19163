"""Per-iteration cost of small nets: caffe-alex's Solver against a bare PyTorch loop of the
same math, alternated in one run.

Three nets, as their Caffe examples train them (SGD with momentum, weight decay, the lr/decay
multipliers of each prototxt):
- logreg: BVLC's brewing-logreg notebook (examples/02-brewing-logreg.ipynb): HDF5Data (10,000
  rows of 4 features, 2 classes, batch 10; the file is written here from a seeded draw), one
  InnerProduct, Accuracy and SoftmaxWithLoss in the train net; the solver of the notebook
  (base_lr 0.01, step policy, momentum 0.9, weight_decay 5e-4, display 1000). The data feed is
  part of both sides: the bare loop slices the same array.
- lenet: examples/fashion_mnist/lenet_train_test.prototxt (Caffe's LeNet) at batch 64;
- cifar10_quick: BVLC's examples/cifar10/cifar10_quick_train_test.prototxt at batch 100 (read
  from the corpus beside the checkout, ../shared/corpus, or CAFFE_ALEX_CORPUS).
For LeNet and CIFAR-10 the Data layer is replaced by an Input layer fed one fixed random batch
on both sides, so the figure is the net and the update, not the LMDB.

The bare loop is what a PyTorch user would write: an ``nn.Module`` of the same layers,
``F.cross_entropy``, ``backward()`` and Caffe's update written per parameter (V = momentum V +
lr lr_mult (g + decay decay_mult W); W -= V); logreg's accuracy only where it is displayed, as
the Solver computes it. It runs with the thread count caffe-alex picks
for the net (one thread for logreg: see Net.thread_policy), and for logreg also with PyTorch's
default, which is what such a loop gets unless its author knows better.

With ``--compile`` logreg also runs with the Solver's compile option, which captures its whole
step (forward, backward, update) as one compiled function (caffe_alex/solvers/captured.py;
compiled before the timing, the time it took printed).

    python benchmarks/small_nets.py [--nets logreg,lenet,cifar10_quick] [--rounds 7]
        [--iters 200] [--compile]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import caffe_alex  # noqa: E402, F401, I001  (first: it sets GOMP_SPINCOUNT before torch loads)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from google.protobuf import text_format  # noqa: E402
from torch import nn  # noqa: E402

from caffe_alex.log import get_logger  # noqa: E402
from caffe_alex.proto import caffe_pb2  # noqa: E402
from caffe_alex.solvers import Solver  # noqa: E402

CORPUS = Path(os.environ.get("CAFFE_ALEX_CORPUS") or ROOT.parent / "shared" / "corpus")
LOGREG_NET = """
name: "logreg"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%s" batch_size: 10 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
"""
NOTEBOOK_SOLVER = """
base_lr: 0.01 lr_policy: "step" gamma: 0.1 stepsize: 5000 momentum: 0.9
weight_decay: 5e-4 display: 1000 max_iter: 10000 solver_mode: CPU random_seed: 1
"""


def load() -> str:
    """The machine's load averages, to print beside every figure."""
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


def logreg_data(folder: Path, rows: int = 10000) -> tuple[np.ndarray, np.ndarray, Path]:
    """The notebook's shapes (make_classification: 4 features, 2 classes) from a seeded draw,
    written as Caffe's HDF5Data reads it; returns the arrays and the list file."""
    import h5py  # imported on use: only this benchmark writes HDF5

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, 4)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0]) + 0.5 * rng.normal(size=rows) > 0).astype(np.float32)
    with h5py.File(folder / "train.h5", "w") as h5:
        h5["data"], h5["label"] = x, y
    listing = folder / "train.txt"
    listing.write_text(f"{folder / 'train.h5'}\n")
    return x, y, listing


def solver_for(net: caffe_pb2.NetParameter, feeds=None, compile=False) -> Solver:
    param = text_format.Parse(NOTEBOOK_SOLVER, caffe_pb2.SolverParameter())
    param.net_param.CopyFrom(net)
    return Solver(param, feeds=feeds, compile=compile)


def input_net(path: Path, batch: int, chw: tuple[int, int, int]) -> caffe_pb2.NetParameter:
    """The TRAIN layers of a prototxt with its Data layers replaced by one Input layer."""
    net = text_format.Parse(path.read_text(), caffe_pb2.NetParameter())
    kept = [lp for lp in net.layer if lp.type != "Data" and not _test_only(lp)]
    del net.layer[:]
    data = net.layer.add(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add(dim=[batch, *chw])
    data.input_param.shape.add(dim=[batch])
    net.layer.extend(kept)
    return net


def _test_only(lp) -> bool:
    return any(rule.phase == caffe_pb2.TEST for rule in lp.include)


# -- the hand-written side ---------------------------------------------------------------------
class LogReg(nn.Module):
    def __init__(self):
        super().__init__()
        self.ip1 = nn.Linear(4, 2)

    def forward(self, x, y, shown=True):
        out = self.ip1(x)
        accuracy = (out.argmax(1) == y).float().mean() if shown else None  # (displayed only)
        return F.cross_entropy(out, y), accuracy


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 20, 5), nn.Conv2d(20, 50, 5)
        self.ip1, self.ip2 = nn.Linear(800, 500), nn.Linear(500, 10)

    def forward(self, x, y, shown=True):
        x = F.max_pool2d(self.conv1(x), 2, 2, ceil_mode=True)
        x = F.max_pool2d(self.conv2(x), 2, 2, ceil_mode=True)
        x = self.ip2(F.relu(self.ip1(x.flatten(1))))
        return F.cross_entropy(x, y), None


class Cifar10Quick(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 32, 5, padding=2), nn.Conv2d(32, 32, 5, padding=2)
        self.conv3 = nn.Conv2d(32, 64, 5, padding=2)
        self.ip1, self.ip2 = nn.Linear(64 * 4 * 4, 64), nn.Linear(64, 10)

    def forward(self, x, y, shown=True):
        x = F.relu(F.max_pool2d(self.conv1(x), 3, 2, ceil_mode=True))
        x = F.avg_pool2d(F.relu(self.conv2(x)), 3, 2, ceil_mode=True)
        x = F.avg_pool2d(F.relu(self.conv3(x)), 3, 2, ceil_mode=True)
        x = self.ip2(self.ip1(x.flatten(1)))
        return F.cross_entropy(x, y), None


class BareLoop:
    """Forward, backward and Caffe's SGD written per parameter; weights copied from the
    solver's train net so both start alike. ``batches()`` yields (x, y) as the solver's feed."""

    def __init__(self, model: nn.Module, solver: Solver, batches):
        self.model, self.batches = model, batches
        p = solver.param
        self.lr, self.momentum, self.decay = p.base_lr, p.momentum, p.weight_decay
        self.gamma, self.stepsize, self.iter, self.display = p.gamma, p.stepsize, 0, p.display
        mults = {}  # the Caffe blob order: each layer's weight then bias
        with torch.no_grad():
            for info in solver.train_net.learnable_params():
                module = getattr(model, info.layer)
                param = module.weight if info.index == 0 else module.bias
                param.copy_(info.param.reshape(param.shape))
                mults[param] = (info.lr_mult, info.decay_mult)
        self.groups = [(p, *mults[p]) for p in model.parameters()]
        self.history = [torch.zeros_like(p) for p in model.parameters()]

    def step(self, iters: int) -> None:
        for _ in range(iters):
            x, y = next(self.batches)
            self.model.zero_grad(set_to_none=True)
            loss, _ = self.model(x, y, shown=self.display and self.iter % self.display == 0)
            loss.backward()
            rate = self.lr * self.gamma ** (self.iter // self.stepsize)
            with torch.no_grad():
                for (param, lr_mult, decay_mult), history in zip(self.groups, self.history):
                    grad = param.grad.add_(param, alpha=self.decay * decay_mult)
                    history.mul_(self.momentum).add_(grad, alpha=rate * lr_mult)
                    param.sub_(history)
            self.iter += 1


def slices(x: np.ndarray, y: np.ndarray, batch: int):
    """The rows in order, batch by batch, round and round (HDF5Data's order, no shuffle)."""
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    for start in itertools.cycle(range(0, len(x) - batch + 1, batch)):
        yield x[start : start + batch], y[start : start + batch]


# -- the contenders per net --------------------------------------------------------------------
def contenders(name: str, folder: Path, compile: bool = False) -> tuple[Solver, dict]:
    """(solver, {label: (run(iters), threads)}) for one net; ``compile``: logreg also with the
    Solver's compile option."""
    if name == "logreg":
        x, y, listing = logreg_data(folder)
        net = text_format.Parse(LOGREG_NET % listing, caffe_pb2.NetParameter())
        solver = solver_for(net)
        bare = BareLoop(LogReg(), solver, slices(x, y, 10))
        threads = 1 if solver.train_net.one_thread() else torch.get_num_threads()
        runs = {"caffe-alex Solver": (solver.step, threads), "bare loop": (bare.step, threads)}
        if threads != torch.get_num_threads():
            runs["bare loop, default threads"] = (bare.step, torch.get_num_threads())
        if compile:  # the whole step captured (solvers/captured.py); compiled before timing
            captured = solver_for(net, compile=True)
            began = time.perf_counter()
            captured.step(3)  # iteration 1 is captured, a chunk cut short (0 displays, 2 is read)
            step = captured._captured
            print(f"logreg: the captured chunk (up to {step.chunk} iterations, "
                  f"{'one loop' if step.looped else 'unrolled'}) compiled in "
                  f"{time.perf_counter() - began:.1f} s")  # fmt: skip
            runs["caffe-alex Solver, compile"] = (captured.step, threads)
        return solver, runs
    if name == "lenet":
        path, batch, chw, model = ROOT / "examples/fashion_mnist/lenet_train_test.prototxt", 64, (
            1, 28, 28), LeNet()  # fmt: skip
    elif name == "cifar10_quick":
        path = CORPUS / "BVLC__caffe/examples/cifar10/cifar10_quick_train_test.prototxt"
        batch, chw, model = 100, (3, 32, 32), Cifar10Quick()
    else:
        raise SystemExit(f"unknown net {name!r}: logreg, lenet or cifar10_quick")
    gen = torch.Generator().manual_seed(0)
    data = {"data": torch.randn(batch, *chw, generator=gen),
            "label": torch.randint(0, 10, (batch,), generator=gen).float()}  # fmt: skip
    solver = solver_for(input_net(path, batch, chw), {"train": itertools.repeat(data), "test": []})
    bare = BareLoop(model, solver, itertools.repeat((data["data"], data["label"].long())))
    threads = 1 if solver.train_net.one_thread() else torch.get_num_threads()
    return solver, {"caffe-alex Solver": (solver.step, threads), "bare loop": (bare.step, threads)}


def measure(runs: dict, rounds: int, iters: int) -> dict[str, list[float]]:
    """ms per iteration of each contender, the contenders taking turns in every round."""
    default = torch.get_num_threads()
    times: dict[str, list[float]] = {label: [] for label in runs}
    try:
        for round_ in range(rounds + 1):  # round 0 warms up
            for label, (run, threads) in runs.items():
                torch.set_num_threads(threads)
                began = time.perf_counter()
                run(iters)
                if round_:
                    times[label].append((time.perf_counter() - began) / iters * 1e3)
    finally:
        torch.set_num_threads(default)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nets", default="logreg,lenet,cifar10_quick")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compile", action="store_true", help="logreg also with the "
                        "Solver's compile option (its whole step captured)")  # fmt: skip
    parser.add_argument("--iters", type=int, default=0, help="iterations per round and "
                        "side (default: 500 for logreg, 20 for the others)")  # fmt: skip
    args = parser.parse_args(argv)
    get_logger().setLevel("WARNING")  # the solvers' display lines would bury the figures
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.nets.split(","):
            solver, runs = contenders(name, Path(tmp), args.compile)
            iters = args.iters or (500 if name == "logreg" else 20)
            before = load()
            times = measure(runs, args.rounds, iters)
            solver.close()
            medians = {label: statistics.median(t) for label, t in times.items()}
            print(f"{name}: ms per iteration, median of {args.rounds} alternating rounds of "
                  f"{iters} ({before} before, {load()} after)")  # fmt: skip
            for label, value in medians.items():
                threads = runs[label][1]
                spread = ", ".join(f"{t:.3f}" for t in times[label])
                print(f"  {label:28s} {value:9.3f} ms  ({threads} thread(s); all: {spread})")
            ratio = medians["caffe-alex Solver"] / medians["bare loop"]
            print(f"  ratio caffe-alex / bare loop: {ratio:.2f}")
            results[name] = {**medians, "ratio": ratio}
    return results


if __name__ == "__main__":
    main()
