"""AlexNet forward+backward at batch 32: caffe-alex's Net vs a hand-written nn.Module.

The reference is the AlexNet a PyTorch user would write: nn.Conv2d with groups,
F.local_response_norm, max pooling with ceil_mode, dropout, nn.Linear and cross-entropy, with
autograd doing the backward. A second copy of it uses caffe-alex's LRN (Caffe's formula, its
own backward) instead of F.local_response_norm: LRN is where the two differ most, so the ratio
against that copy measures the rest of the net (the builder's forward loop, the layers' glue).
All three get the same weights and the same batch and run in turn in one process (each repeat
runs every one once); the script prints the median times and the two ratios.

    python benchmarks/alexnet_cpu.py [--batch 32] [--repeats 5] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from caffe_alex.layers.lrn import cross_channel_lrn
from caffe_alex.net import Net

TRAIN_VAL = Path(__file__).resolve().parents[1] / "models" / "bvlc_alexnet" / "train_val.prototxt"
PLAIN, SAME_LRN = "hand-written nn.Module", "hand-written, Caffe's LRN"


def torch_lrn(x):
    return F.local_response_norm(x, 5, 1e-4, 0.75, 1.0)


def caffe_alex_lrn(x):
    return cross_channel_lrn(x, 5, 1e-4, 0.75, 1.0)


class HandWrittenAlexNet(nn.Module):
    def __init__(self, lrn=torch_lrn):
        super().__init__()
        self.lrn = lrn
        self.conv1 = nn.Conv2d(3, 96, 11, stride=4)
        self.conv2 = nn.Conv2d(96, 256, 5, padding=2, groups=2)
        self.conv3 = nn.Conv2d(256, 384, 3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, 3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, 3, padding=1, groups=2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, 1000)

    def forward(self, x, label):
        x = F.max_pool2d(self.lrn(F.relu(self.conv1(x))), 3, 2, ceil_mode=True)
        x = F.max_pool2d(self.lrn(F.relu(self.conv2(x))), 3, 2, ceil_mode=True)
        x = F.relu(self.conv5(F.relu(self.conv4(F.relu(self.conv3(x))))))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True).flatten(1)
        x = F.dropout(F.relu(self.fc6(x)), 0.5, self.training)
        x = F.dropout(F.relu(self.fc7(x)), 0.5, self.training)
        return F.cross_entropy(self.fc8(x), label)


def build(batch: int, device: torch.device):
    """caffe-alex's AlexNet and the two hand-written ones, with its weights."""
    net = Net.from_prototxt(
        str(TRAIN_VAL), "TRAIN", input_shapes={"data": (batch, 3, 227, 227), "label": (batch,)}
    )
    references = [HandWrittenAlexNet(torch_lrn), HandWrittenAlexNet(caffe_alex_lrn)]
    with torch.no_grad():
        for reference in references:
            for name, blobs in net.params.items():
                getattr(reference, name).weight.copy_(blobs[0])
                getattr(reference, name).bias.copy_(blobs[1])
    return net.to(device), [r.to(device).train() for r in references]


def step_caffe_alex(net, data, label):
    net(data=data, label=label)
    net.loss.backward()


def step_reference(module, data, label):
    module(data, label.long()).backward()


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net, (plain, same_lrn) = build(args.batch, device)
    data = torch.randn(args.batch, 3, 227, 227, device=device)
    label = torch.randint(0, 1000, (args.batch,), device=device).float()
    runs = {
        "caffe-alex": lambda: step_caffe_alex(net, data, label),
        PLAIN: lambda: step_reference(plain, data, label),
        SAME_LRN: lambda: step_reference(same_lrn, data, label),
    }
    for fn in runs.values():  # warm-up
        fn()
    times = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, fn in runs.items():  # in turn, so drift hits every one alike
            for module in (net, plain, same_lrn):
                module.zero_grad(set_to_none=True)
            times[name].append(timed(fn, device))
    print(
        f"AlexNet forward+backward, batch {args.batch}, {device}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats}:"
    )
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, value in medians.items():
        print(
            f"  {name:26s} {value * 1000:9.1f} ms   (all: "
            + ", ".join(f"{t * 1000:.0f}" for t in times[name])
            + ")"
        )
    ours = medians["caffe-alex"]
    print(f"  ratio caffe-alex / {PLAIN}: {ours / medians[PLAIN]:.3f}")
    print(f"  ratio caffe-alex / {SAME_LRN} (the rest of the net): {ours / medians[SAME_LRN]:.3f}")


if __name__ == "__main__":
    main()
