"""The pycaffe path against the module path on the same net, the same weights, the same inputs.

pycaffe's ``caffe.Net`` runs the plan as Caffe does (layerwise.py: persistent blobs, a graph
per layer, every diff kept); the module runs it as one autograd graph. Timed alternately in one
process, median of ``--rounds``:

- forward(): a TEST net without a loss (pycaffe builds no graph; the module under no_grad);
- forward(end=...): the same net up to a middle layer (the module through ``Net.run``);
- forward + backward and backward alone: a TRAIN net with its loss (pycaffe: ``forward()``
  then ``backward()``; the module: ``net(...)`` then ``net.loss.backward()``);
- solver.step: the Solver's iteration with the nets as one graph (``caffe-alex train``) and
  layer by layer (``layerwise``, pycaffe's SGDSolver), on one fixed batch.

    python benchmarks/pycaffe_path.py [--model alexnet|lenet] [--batch 8] [--rounds 5]
        [--device cpu]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from google.protobuf import text_format

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import caffe  # noqa: E402
from benchmarks.alexnet_cpu import timed  # noqa: E402
from caffe_alex.proto import caffe_pb2  # noqa: E402
from caffe_alex.solvers import Solver  # noqa: E402

LENET = """name: "LeNet"
layer { name: "data" type: "Input" top: "data" top: "label"
        input_param { shape { dim: %(n)d dim: 1 dim: 28 dim: 28 } shape { dim: %(n)d } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 20 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
        convolution_param { num_output: 50 kernel_size: 5 weight_filler { type: "xavier" } } }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1"
        inner_product_param { num_output: 500 weight_filler { type: "xavier" } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 10 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""
MIDDLE = {"alexnet": "pool2", "lenet": "pool1"}


def train_net(model: str, batch: int) -> caffe_pb2.NetParameter:
    """The TRAIN net with one Input layer for data and label."""
    if model == "lenet":
        return text_format.Parse(LENET % {"n": batch}, caffe_pb2.NetParameter())
    net = text_format.Parse((ROOT / "models/bvlc_alexnet/train_val.prototxt").read_text(),
                            caffe_pb2.NetParameter())  # fmt: skip
    layers = [layer for layer in net.layer if layer.type not in ("Data", "Accuracy")]
    del net.layer[:]
    data = net.layer.add(name="data", type="Input", top=["data", "label"])
    data.input_param.shape.add(dim=[batch, 3, 227, 227])
    data.input_param.shape.add(dim=[batch])
    net.layer.extend(layers)
    return net


def deploy_net(train: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """The same layers without the loss and the label: a deploy net."""
    net = caffe_pb2.NetParameter()
    net.CopyFrom(train)
    net.layer[0].top.pop()
    net.layer[0].input_param.shape.pop()
    kept = [layer for layer in net.layer if "label" not in layer.bottom]
    del net.layer[:]
    net.layer.extend(kept)
    return net


def pycaffe_net(net_param, phase, folder: str, name: str):
    path = Path(folder) / f"{name}.prototxt"
    path.write_text(text_format.MessageToString(net_param))
    return caffe.Net(str(path), phase)


def main(argv=None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["alexnet", "lenet"], default="alexnet")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        caffe.set_mode_gpu()
        caffe.set_device(device.index or 0)
    train = train_net(args.model, args.batch)
    shape = tuple(train.layer[0].input_param.shape[0].dim)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen).to(device)
    classes = 10 if args.model == "lenet" else 1000
    label = torch.randint(0, classes, (args.batch,), generator=gen).float().to(device)
    with tempfile.TemporaryDirectory() as folder:
        deploy = pycaffe_net(deploy_net(train), caffe.TEST, folder, "deploy")
        trainer = pycaffe_net(train, caffe.TRAIN, folder, "train")
    # the module of each pycaffe net is the same object: the same weights, no copies
    deploy_module, train_module = deploy.module, trainer.module
    deploy.blobs["data"].data[...] = x.cpu().numpy()
    trainer.blobs["data"].data[...] = x.cpu().numpy()
    trainer.blobs["label"].data[...] = label.cpu().numpy()
    end = MIDDLE[args.model]
    end_index = deploy_module.layer_names.index(end)

    def module_forward():
        with torch.no_grad():
            deploy_module(data=x)

    def module_forward_end():
        with torch.no_grad():
            deploy_module.run({"data": x}, 0, end_index)

    def module_forward_backward():
        train_module(data=x, label=label)
        train_module.loss.backward()

    def module_backward():
        train_module(data=x, label=label)
        return timed(train_module.loss.backward, device)

    def pycaffe_backward():
        trainer.forward()
        return timed(trainer.backward, device)

    solvers = {}
    for layerwise in (False, True):
        param = caffe_pb2.SolverParameter(base_lr=0.001, momentum=0.9, weight_decay=5e-4,
                                          lr_policy="fixed", random_seed=1)  # fmt: skip
        param.net_param.CopyFrom(train)
        batch = {"data": x, "label": label}
        feeds = {"train": itertools.repeat(batch), "test": []}
        solvers[layerwise] = Solver(param, device=device, layerwise=layerwise, feeds=feeds)

    cases = {
        "forward()": (module_forward, lambda: deploy.forward()),
        f"forward(end='{end}')": (module_forward_end, lambda: deploy.forward(end=end)),
        "forward + backward": (
            module_forward_backward,
            lambda: (trainer.forward(), trainer.backward()),
        ),  # fmt: skip
        "backward()": (module_backward, pycaffe_backward),
        "solver.step(1)": (lambda: solvers[False].step(1), lambda: solvers[True].step(1)),
    }
    times = {name: ([], []) for name in cases}
    for module_fn, pycaffe_fn in cases.values():  # warm-up
        module_fn(), pycaffe_fn()
    for _ in range(args.rounds):
        for name, pair in cases.items():
            for side, fn in enumerate(pair):
                inner = []
                took = timed(lambda fn=fn, inner=inner: inner.append(fn()), device)
                # backward alone is timed inside (after its untimed forward)
                times[name][side].append(inner[0] if isinstance(inner[0], float) else took)
    where = (f"CPU, {torch.get_num_threads()} threads" if device.type == "cpu"
             else torch.cuda.get_device_name(device))  # fmt: skip
    print(f"{args.model}, batch {args.batch}, {where}: module path vs pycaffe path, median ms "
          f"of {args.rounds} alternated rounds")  # fmt: skip
    result = {}
    for name, (module_t, pycaffe_t) in times.items():
        m, p = statistics.median(module_t) * 1e3, statistics.median(pycaffe_t) * 1e3
        result[name] = (m, p)
        print(f"  {name:22s} module {m:9.2f}   pycaffe {p:9.2f}   ratio pycaffe / module "
              f"{p / m:5.2f}")  # fmt: skip
    for solver in solvers.values():
        solver.close()
    np.testing.assert_allclose(  # both solvers trained alike
        solvers[False].train_net.params["conv1"][0].detach().cpu().numpy(),
        solvers[True].train_net.params["conv1"][0].detach().cpu().numpy(),
        rtol=1e-3,
        atol=1e-5,
    )
    return result


if __name__ == "__main__":
    main()
