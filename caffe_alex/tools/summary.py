"""Per-layer summary of a built net: top shapes, learnable parameters, multiply-adds and the
memory its activations take.

What is counted:
- parameters: the elements of a layer's learnable blobs; a blob shared from an earlier layer
  counts once, under its owner.
- multiply-adds (MACs): the dot products of the weight layers, read from the weight layout so
  that groups, dilation and N-d kernels need no special cases. Convolution and InnerProduct:
  top elements x weight elements per output (C_in/group x kernel, or K); Deconvolution (the
  transpose): bottom elements x (C_out/group x kernel). Bias adds are not counted, nor the
  element-wise and reduction layers (ReLU, LRN, Pooling, Eltwise, BatchNorm, Scale, Softmax,
  ...): they are a small share (LRN would add 0.3% to AlexNet) and have no agreed MAC count.
- activation memory: float32 bytes of each top blob; a top written in place over its bottom
  is counted once, at the layer that first wrote the blob.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..net import Net

BYTES_PER_ELEMENT = 4  # float32
_MAC_LAYERS = {"Convolution": "top", "InnerProduct": "top", "Deconvolution": "bottom"}


def build_for_shapes(net_param, phase: str = "TEST", **kwargs) -> Net:
    """The net built on PyTorch's meta device: shapes and parameter counts without filling
    the weights (AlexNet in milliseconds instead of a second). Falls back to the CPU should a
    layer's set-up need real values."""
    try:
        with torch.device("meta"):
            return Net(net_param, phase, **kwargs)
    except Exception:  # the CPU build below raises the real problem, if there is one
        # a layer's set-up read values (e.g. a Python layer filling its blobs; the builder
        # reports that as a CaffeAlexError): build for real
        return Net(net_param, phase, **kwargs)


@dataclass
class Row:
    name: str
    type: str
    top_shapes: list[tuple[int, ...]]
    params: int
    macs: int
    memory: int  # bytes


@dataclass
class Summary:
    rows: list[Row] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def memory(self) -> int:
        return sum(r.memory for r in self.rows)


def _macs(net: Net, step, layer_type: str) -> int:
    side = _MAC_LAYERS.get(layer_type)
    layer = net.layers[step.key]
    if side is None or not len(layer.blobs):
        return 0
    blobs = step.tops if side == "top" else step.bottoms
    per_element = math.prod(layer.blobs[0].shape[1:])
    return math.prod(net.blob_shapes[blobs[0]]) * per_element


def _own_params(net: Net) -> dict[str, int]:
    counts: dict[str, int] = {}
    for info in net.param_infos:
        if info.owner is None:
            counts[info.layer] = counts.get(info.layer, 0) + info.param.numel()
    return counts


def summarize(net: Net) -> Summary:
    """One Row per layer of ``net``, in Caffe's order (totals are properties of the result)."""
    params = _own_params(net)
    written: set[str] = set()
    summary = Summary()
    for name, layer_type, step in zip(net.layer_names, net.layer_types, net.steps):
        tops = [t for t in step.tops if not t.startswith(f"({name} automatic top")]
        new = [t for t in tops if t not in step.bottoms and t not in written]
        written.update(new)
        memory = sum(math.prod(net.blob_shapes[t]) for t in new) * BYTES_PER_ELEMENT
        shapes = [net.blob_shapes[t] for t in tops]
        macs = _macs(net, step, layer_type)
        summary.rows.append(Row(name, layer_type, shapes, params.get(name, 0), macs, memory))
    return summary


def _size(n: float, units: tuple[str, ...], base: int) -> str:
    for unit in units:
        if abs(n) < base or unit == units[-1]:
            return f"{n:.4g} {unit}".rstrip()
        n /= base
    raise AssertionError("unreachable")


def table_lines(summary: Summary) -> list[str]:
    """The summary as text: a header, a line per layer, and the totals."""
    header = ("layer", "type", "top shapes", "params", "MACs", "memory")
    cells = [header]
    for r in summary.rows:
        shapes = ", ".join("x".join(map(str, s)) or "scalar" for s in r.top_shapes)
        mem = _size(r.memory, ("B", "KiB", "MiB", "GiB"), 1024) if r.memory else "0"
        cells.append((r.name, r.type, shapes, f"{r.params:,}", f"{r.macs:,}", mem))
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    align = ["<", "<", "<", ">", ">", ">"]
    lines = ["  ".join(f"{c:{a}{w}}" for c, a, w in zip(row, align, widths)) for row in cells]
    lines.insert(1, "-" * len(lines[0]))
    short = ("", "K", "M", "G", "T")
    lines += [
        "-" * len(lines[0]),
        f"Total parameters: {summary.params:,} ({_size(summary.params, short, 1000)})",
        f"Total multiply-adds: {summary.macs:,} ({_size(summary.macs, short, 1000)})",
        f"Activation memory (float32): {summary.memory:,} bytes "
        f"({_size(summary.memory, ('B', 'KiB', 'MiB', 'GiB'), 1024)})",
    ]
    return lines
