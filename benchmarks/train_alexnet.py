"""AlexNet training iterations: caffe-alex's Solver vs a hand-written PyTorch training loop.

Both train models/bvlc_alexnet's net (batch 32, TRAIN phase) with the reference solver's SGD
(momentum 0.9, weight decay 5e-4, lr_mult/decay_mult 1/1 for weights and 2/0 for biases) on the
same fixed batch. The reference is the loop a PyTorch user would write: the hand-written module
of benchmarks/alexnet_cpu.py, cross-entropy, backward, and Caffe's update in place
(V = momentum V + lr lr_mult (g + decay w); W -= V). They run alternately in one process, a few
iterations at a time, and the script prints the median seconds per iteration, images per second
and the ratio. ``--precision bf16|fp16`` and ``--channels-last`` apply to both sides (the
Solver's options of the same names; torch.autocast and NHWC memory for the hand-written loop).

    python benchmarks/train_alexnet.py [--batch 32] [--rounds 5] [--iters 2] [--device cuda:0]
        [--precision fp32|bf16|fp16] [--channels-last]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import caffe_alex  # noqa: E402, F401, I001  (first: it sets GOMP_SPINCOUNT before torch loads)
import torch  # noqa: E402
from google.protobuf import text_format  # noqa: E402

from benchmarks.alexnet_cpu import HandWrittenAlexNet, timed  # noqa: E402
from caffe_alex.proto import caffe_pb2  # noqa: E402
from caffe_alex.solvers import Solver  # noqa: E402


def solver_param(batch: int) -> caffe_pb2.SolverParameter:
    """The reference solver, its net with the Data layers replaced by one Input layer."""
    net = text_format.Parse((ROOT / "models/bvlc_alexnet/train_val.prototxt").read_text(),
                            caffe_pb2.NetParameter())  # fmt: skip
    layers = [layer for layer in net.layer if layer.type != "Data"]
    del net.layer[:]
    data = net.layer.add(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add(dim=[batch, 3, 227, 227])
    data.input_param.shape.add(dim=[batch])
    net.layer.extend(layers)
    solver = text_format.Parse((ROOT / "models/bvlc_alexnet/solver.prototxt").read_text(),
                               caffe_pb2.SolverParameter())  # fmt: skip
    solver.ClearField("net")
    solver.net_param.CopyFrom(net)
    solver.ClearField("test_iter")
    solver.test_interval, solver.display, solver.snapshot = 0, 0, 0
    solver.solver_mode = caffe_pb2.SolverParameter.CPU
    solver.random_seed = 1
    return solver


class HandWrittenTraining:
    def __init__(self, solver: Solver, lr: float, momentum: float, decay: float,
                 dtype=None, channels_last: bool = False):  # fmt: skip
        self.model = HandWrittenAlexNet().to(solver.device)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.device, self.dtype = solver.device, dtype
        with torch.no_grad():
            for name, blobs in solver.train_net.params.items():
                getattr(self.model, name).weight.copy_(blobs[0])
                getattr(self.model, name).bias.copy_(blobs[1])
        self.groups = [(m.weight, 1.0, 1.0) for m in self.model.children()]
        self.groups += [(m.bias, 2.0, 0.0) for m in self.model.children()]
        self.history = [torch.zeros_like(p) for p, _, _ in self.groups]
        self.lr, self.momentum, self.decay = lr, momentum, decay

    def step(self, data, label) -> None:
        self.model.zero_grad(set_to_none=True)
        autocast = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype
                    else contextlib.nullcontext())  # fmt: skip
        scale = 1024.0 if self.dtype == torch.float16 else 1.0  # a fixed loss scale suffices here
        with autocast:
            loss = self.model(data, label.long())  # forward ends in the cross-entropy loss
        (loss * scale).backward()
        with torch.no_grad():
            for (param, lr_mult, decay_mult), history in zip(self.groups, self.history):
                grad = param.grad.div(scale).add_(param, alpha=self.decay * decay_mult)
                history.mul_(self.momentum).add_(grad, alpha=self.lr * lr_mult)
                param.sub_(history)


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=2, help="iterations per round and side")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(args.batch, 3, 227, 227, generator=gen)
    if args.channels_last:
        data = data.contiguous(memory_format=torch.channels_last)
    label = torch.randint(0, 1000, (args.batch,), generator=gen).float()
    batch = {"data": data.to(device), "label": label.to(device)}
    param = solver_param(args.batch)
    solver = Solver(param, device=device, feeds={"train": itertools.repeat(batch), "test": []},
                    precision=args.precision, channels_last=args.channels_last)  # fmt: skip
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    reference = HandWrittenTraining(solver, param.base_lr, param.momentum, param.weight_decay,
                                    dtype, args.channels_last)  # fmt: skip
    runs = {"caffe-alex Solver": lambda: solver.step(args.iters),
            "hand-written loop": lambda: [reference.step(batch["data"], batch["label"])
                                          for _ in range(args.iters)]}  # fmt: skip
    for fn in runs.values():
        fn()  # warm-up
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            times[name].append(timed(fn, device) / args.iters)
    where = (f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu"
             else torch.cuda.get_device_name(device))  # fmt: skip
    options = args.precision + (", channels_last" if args.channels_last else "")
    print(f"AlexNet training iteration (SGD, batch {args.batch}, {options}, {where}), "
          f"median of {args.rounds} rounds:")  # fmt: skip
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, value in medians.items():
        print(
            f"  {name:20s} {value:7.3f} s/iter {args.batch / value:8.0f} images/s   (all: "
            + ", ".join(f"{t:.2f}" for t in times[name])
            + ")"
        )
    print(
        f"  ratio caffe-alex / hand-written: "
        f"{medians['caffe-alex Solver'] / medians['hand-written loop']:.3f}"
    )
    return medians


if __name__ == "__main__":
    main()
