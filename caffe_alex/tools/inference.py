"""The inference fast path: a TEST-phase net made faster for deploy, extract-features,
Classifier and export, at a stated cost in exactness.

``for_inference(net, fast=True, bf16=False, compile=False, keep=())`` returns the net
prepared (a copy by default; still a Net, called the same way, run under
``torch.inference_mode``). What ``fast`` does:
- BatchNorm (with global statistics) and Scale layers that follow a Convolution are folded
  into its weights and bias (W k, (b - mean) k + beta, k = gamma / sqrt(var + eps), computed
  in float64), and run as nothing. The numbers move by float32 rounding: within 1e-5 of each
  output's largest value on ResNet-50 (tests/tools/test_inference.py). A chain is folded only
  where nothing but the chain reads its intermediate blobs and none of them is a net output or
  named in ``keep`` (extract-features' blobs): those keep their exact values.
- 4-D convolution weights and inputs in channels_last memory order, which oneDNN's CPU
  convolutions run faster (measured in docs/benchmarks.md); the numbers are those of NCHW up to
  the order of the sums.
- On the CPU, InnerProduct weights laid out by oneDNN for its own matrix products (a copy made
  once: AlexNet's fc6 at batch 1 in 3.9 ms instead of 5.8), up to the order of the sums too.
  Both layouts are run-time ones, left out where ``channels_last`` is False (an export).
``bf16=True`` runs the forward under torch.autocast in bfloat16 (outputs back in float32):
faster on CPUs with AVX512-BF16 or AMX, about 1e-2 relative off (measured and printed by
``caffe-alex deploy --bf16``, see ``compare_outputs``). ``compile=True`` (or a backend name)
traces the prepared net whole with torch.export and compiles that graph with torch.compile
(inductor with weight freezing: convolution + bias + ReLU fused, weights prepacked): a
one-time compilation of a minute or more per input shape on a small machine, then each call
is one compiled graph; only the outputs and the ``keep`` blobs are written back to ``blobs``.

The default path stays Caffe's numbers: fast is an option (``--fast``), see docs/benchmarks.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..errors import CaffeAlexError
from ..layers.indexing import tracing
from ..log import get_logger
from ..net import Net
from ..netparts.inputs import bind_inputs
from ..registry import BlobList
from .tracing import quiet_export, trace_net

# What for_inference does, by flag, for docs and messages
OPTIONS = {
    "fast": "BatchNorm/Scale folded into the convolutions, channels_last (within 1e-5 relative)",
    "bf16": "bfloat16 autocast (about 1e-2 relative)",
    "compile": "torch.compile",
}


class _FastForward:
    """The prepared net's forward: inputs in channels_last, bf16 autocast, torch.compile, all
    under torch.inference_mode, around the Net's own forward (set as the instance's
    ``forward``, so the prepared net stays a Net for every caller)."""

    def __init__(self, net: Net, *, channels_last: bool, bf16: bool, compile=False,
                 keep: Iterable[str] = ()):  # fmt: skip
        self.net, self.forward = net, Net.forward.__get__(net)
        self.channels_last, self.bf16 = channels_last, bf16
        if compile:
            backend = compile if isinstance(compile, str) else "inductor"
            self.forward = _CompiledForward(net, keep, backend)

    def __call__(self, *args, **inputs) -> dict[str, torch.Tensor]:
        if self.channels_last:
            args = tuple(_nhwc(a) for a in args)
            inputs = {k: _nhwc(v) for k, v in inputs.items()}
        with torch.inference_mode():
            if not self.bf16:
                return self.forward(*args, **inputs)
            with torch.autocast(_device(self.net).type, dtype=torch.bfloat16):
                outputs = self.forward(*args, **inputs)
            blobs = self.net.blobs
            for name, value in blobs.items():  # callers read float32, as from the exact path
                if value.is_floating_point() and value.dtype != torch.float32:
                    blobs[name] = value.float()
            return {name: blobs[name] for name in outputs}


def for_inference(net: Net, *, fast: bool = True, bf16: bool = False, compile=False,
                  channels_last: bool | None = None, keep: Iterable[str] = (),
                  copy_net: bool = True) -> Net:  # fmt: skip
    """``net`` made faster for inference (see the module's notes): a Net still, its forward
    wrapped. ``channels_last`` defaults to ``fast`` (False for an export: folding only);
    ``copy_net=False`` changes ``net`` itself instead of a copy. The result's ``folded`` lists
    the layers folded away, ``folded_blobs`` the blobs whose values folding changed."""
    if net.phase != "TEST":
        raise CaffeAlexError(f"the inference fast path is for TEST-phase nets, not {net.phase}")
    if copy_net and (fast or compile):
        net = copy.deepcopy(net)
    net.eval()
    folded, changed = [], set()
    channels_last = fast if channels_last is None else channels_last
    if fast:
        with torch.no_grad():
            folded, changed = fold_batchnorm(net, keep)
    packed = []
    if fast and channels_last and not compile:  # (inductor lays out the weights itself)
        packed = pack_inner_products(net)
    channels_last = channels_last and _has_4d_weights(net)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if bf16 and _device(net).type == "cpu" and not _native_bf16():
        get_logger().warning("bf16: this CPU has no native bfloat16 (AVX512-BF16 or AMX): "
                             "PyTorch emulates it, several times slower than float32")  # fmt: skip
    if channels_last or bf16 or compile or packed:  # (packed layers need inference_mode)
        net.forward = _FastForward(
            net, channels_last=channels_last, bf16=bf16, compile=compile, keep=keep
        )
    net.folded, net.folded_blobs = folded, changed
    return net


class _CompiledForward:
    """torch.compile over the net traced whole (torch.export, non-strict), compiled once per
    input shapes. Compiling Net.forward itself would not give one graph: its loop calls each
    layer's forward, and dynamo compiles those shared code objects again for every shape met
    until its recompile limit, then runs them eagerly. The outputs (and the ``keep`` blobs that
    exist) are written to ``blobs``, as the exact path leaves them."""

    def __init__(self, net: Net, keep: Iterable[str], backend: str):
        self.net, self.backend = net, backend
        wanted = [*net.output_names, *(name for name in keep if name in net.blob_shapes)]
        self.names = list(dict.fromkeys(wanted))
        self.compiled = {}

    def __call__(self, *args, **inputs) -> dict[str, torch.Tensor]:
        bound = bind_inputs(self.net.input_names, args, inputs)
        values = [bound[name] for name in self.net.input_names]
        shapes = {name: tuple(v.shape) for name, v in bound.items()}
        if any(self.net.blob_shapes[name] != shape for name, shape in shapes.items()):
            self.net.reshape(**shapes)  # blob_shapes as the exact path leaves them
        key = tuple((v.shape, v.dtype, v.device, v.stride()) for v in values)
        compiled = self.compiled.get(key)
        if compiled is not None:
            outputs = compiled(*values)
        else:
            import torch._inductor.config as inductor  # imported on use: heavy, compile only

            compiled = self.compiled[key] = self._compile(values)
            with inductor.patch(freezing=True):  # this first call of the shape compiles
                outputs = compiled(*values)
        blobs = {**bound, **dict(zip(self.names, outputs))}  # no stale blob of an earlier pass
        self.net.__dict__["blobs"] = blobs  # as Net.forward sets it (no Module __setattr__)
        return {name: blobs[name] for name in self.net.output_names}

    def _compile(self, values):
        wrapped = self.net.__dict__.pop("forward", None)  # trace Net.forward, not this wrapper
        try:
            with torch.inference_mode(False), torch.no_grad(), quiet_export():
                program = trace_net(self.net, tuple(values), False, self.names,
                                 what="torch.compile")  # fmt: skip
        finally:
            if wrapped is not None:
                self.net.forward = wrapped
        get_logger().info("compiling the net for inputs %s (once per input shape)",
                          [tuple(v.shape) for v in values])  # fmt: skip
        return torch.compile(program.module(), backend=self.backend, dynamic=False)


def _device(net: Net) -> torch.device:
    return next((p.device for p in net.parameters()), torch.device("cpu"))


def _native_bf16() -> bool:
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else True
    except RuntimeError:  # an op missing from this build: assume nothing
        return True


def _nhwc(value):
    if isinstance(value, torch.Tensor) and value.dim() == 4:
        return value.contiguous(memory_format=torch.channels_last)
    return value


def _has_4d_weights(net: Net) -> bool:
    return any(p.dim() == 4 for p in net.parameters())


# -- oneDNN's InnerProduct weights ----------------------------------------------------------------
class _PackedInnerProduct(nn.Module):
    """An InnerProduct layer with its weight in the layout oneDNN's CPU matrix products read
    fastest (``torch.ops.mkldnn``'s prepacked linear; F.linear streams Caffe's layout, about
    1.5x slower at batch 1 where the weight's size sets the time). Where a gradient is
    recorded, or the input is not float32 on the CPU, or a trace runs, the layer runs as is."""

    def __init__(self, net: Net, key: str, batch: int):
        super().__init__()
        layer = self.layer = net.layers[key]  # the layer it stands for, run where unpacked
        for name in ("is_source", "in_place", "can_overwrite_bottom", "output_needed_by_backward",
                     "name", "type_name"):  # fmt: skip
            setattr(self, name, getattr(layer, name))
        weight = layer.blobs[0].detach()
        weight = (weight.t() if layer.transpose else weight).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, max(batch, 1))
        self.bias = layer.blobs[1].detach() if layer.bias_term else None

    @property
    def blobs(self):
        return self.layer.blobs

    def top_shapes(self, bottom_shapes):
        return self.layer.top_shapes(bottom_shapes)

    def forward(self, x):
        if (
            torch.is_grad_enabled()
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (tracing())
        ):
            return self.layer(x)
        rows = x.flatten(self.layer._axis(x.shape))
        return torch.ops.mkldnn._linear_pointwise(rows.contiguous(), self.packed, self.bias,
                                                  "none", [], "")  # fmt: skip


def pack_inner_products(net: Net) -> list[str]:
    """Each float32 CPU InnerProduct of ``net`` given oneDNN's weight layout (a snapshot of its
    weights: ``for_inference`` makes the net it changes); returns the layers' names."""
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or not (
        torch.backends.mkldnn.is_available()
    ):
        return []
    batch = next((net.blob_shapes[n][0] for n in net.input_names if net.blob_shapes[n]), 1)
    packed = []
    for name, step, kind in zip(net.layer_names, net.steps, net.layer_types):
        blobs = net.layers[step.key].blobs
        weight = blobs[0] if kind == "InnerProduct" and len(blobs) else None
        if weight is not None and weight.device.type == "cpu" and weight.dtype == torch.float32:
            net.layers[step.key] = _PackedInnerProduct(net, step.key, batch)
            packed.append(name)
    return packed


# -- BatchNorm / Scale folding -----------------------------------------------------------------
class _Folded(nn.Module):
    """Stands where a folded BatchNorm or Scale layer stood: its top is its bottom."""

    is_source = False
    in_place = False
    can_overwrite_bottom = False
    output_needed_by_backward = False

    def __init__(self, name: str, type_name: str):
        super().__init__()
        self.name, self.type_name = name, type_name
        self.blobs = BlobList()

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        return x


def fold_batchnorm(net: Net, keep: Iterable[str] = ()) -> tuple[list[str], set[str]]:
    """Fold each Convolution -> BatchNorm (global statistics) [-> Scale] chain, and each
    Convolution -> Scale, into the convolution; returns the names of the layers folded away and
    of the blobs whose values changed (the chain's tops before its last)."""
    keep = set(keep) | set(net.output_names)
    steps = net.steps
    readers = _readers(steps)
    folded: list[str] = []
    changed: set[str] = set()
    modules = [net.layers[step.key] for step in steps]  # (read, never run, here)
    for i, step in enumerate(steps):
        conv = modules[i]
        if not _foldable_conv(net.layer_types[i], conv, step):
            continue
        chain = _chain(net, steps, readers, i, keep)
        if not chain:
            continue
        weight, bias = _folded_params(conv, [modules[j] for j in chain],
                                      [net.layer_types[j] for j in chain])  # fmt: skip
        conv.blobs[0].copy_(weight)
        if conv.bias_term:
            conv.blobs[1].copy_(bias)
        else:
            conv.bias_term = True
            conv.add_blob(bias.to(conv.blobs[0].dtype), requires_grad=False)
        last = steps[chain[-1]].tops[0]
        for j in [i, *chain[:-1]]:
            changed.update(t for t in steps[j].tops if t != last)
        for j in chain:
            name = net.layer_names[j]
            net.layers[steps[j].key] = _Folded(name, net.layer_types[j])
            folded.append(name)
    return folded, changed


def _readers(steps) -> dict[tuple[str, int], list[int]]:
    """(blob name, index of the step that wrote this version) -> the steps that read it."""
    writer: dict[str, int] = {}
    readers: dict[tuple[str, int], list[int]] = {}
    for i, step in enumerate(steps):
        for bottom in step.bottoms:
            readers.setdefault((bottom, writer.get(bottom, -1)), []).append(i)
        for top in step.tops:
            writer[top] = i
    return readers


def _foldable_conv(kind: str, conv, step) -> bool:
    return (kind == "Convolution" and conv.axis == 1 and len(step.bottoms) == 1
            and len(step.tops) == 1 and not any(step.detach))  # fmt: skip


def _chain(net: Net, steps, readers, start: int, keep: set[str]) -> list[int]:
    """The BatchNorm/Scale steps right after convolution ``start`` that can fold into it."""
    chain, current, wanted = [], start, ("BatchNorm", "Scale")
    while wanted:
        top = steps[current].tops[0]
        after = readers.get((top, current), [])
        if len(after) != 1:
            break
        nxt = after[0]
        kind, layer = net.layer_types[nxt], net.layers[steps[nxt].key]
        if kind not in wanted or not _foldable(kind, layer, steps[nxt]):
            break
        if top != steps[nxt].tops[0] and top in keep:  # a blob the caller reads would change
            break
        chain.append(nxt)
        current = nxt
        wanted = wanted[wanted.index(kind) + 1 :]
    return chain


def _foldable(kind: str, layer, step) -> bool:
    if len(step.bottoms) != 1 or len(step.tops) != 1:
        return False
    if kind == "BatchNorm":
        return bool(layer.use_global_stats)
    shape = tuple(layer.blobs[0].shape)
    return layer.axis == 1 and len(shape) == 1 and not layer.two_bottoms


def _folded_params(conv, layers, kinds) -> tuple[torch.Tensor, torch.Tensor]:
    """The convolution's weight and bias with the chain's affine maps folded in (float64)."""
    weight = conv.blobs[0].detach().double()
    channels = weight.shape[0]
    bias = (conv.blobs[1].detach().double() if conv.bias_term
            else torch.zeros(channels, dtype=torch.float64, device=weight.device))  # fmt: skip
    scale = torch.ones(channels, dtype=torch.float64, device=weight.device)
    for layer, kind in zip(layers, kinds):
        if kind == "BatchNorm":
            mean, var = (t.double() for t in layer._global_stats())
            k = 1.0 / torch.sqrt(var + layer.eps)
            scale, bias = scale * k, (bias - mean) * k
        else:
            gamma = layer.blobs[0].detach().double()
            scale, bias = scale * gamma, bias * gamma
            if layer.bias_term:
                bias = bias + layer.blobs[-1].detach().double()
    view = (channels,) + (1,) * (weight.dim() - 1)
    return (weight * scale.view(view)).to(conv.blobs[0].dtype), bias.to(conv.blobs[0].dtype)


# -- the cost of an option -----------------------------------------------------------------------
def compare_outputs(exact: dict, other: dict) -> dict[str, float]:
    """Per output: the largest |difference| relative to the exact output's largest |value|."""
    result = {}
    for name, value in exact.items():
        a = np.asarray(value, dtype=np.float64)
        b = np.asarray(other[name], dtype=np.float64)
        result[name] = float(np.abs(a - b).max() / max(np.abs(a).max(), math.ulp(1.0)))
    return result


def output_cost(exact: Net, prepared: Net, inputs: dict) -> dict:
    """What the prepared net's options cost on ``inputs`` (its last outputs are kept): the
    largest difference of its first output to the exact path's, relative to that output's
    largest value, and the share of items whose top-1 class agrees."""
    name = prepared.output_names[0]
    got = prepared.blobs[name].float()
    with torch.inference_mode():
        want = exact(**inputs)[name].float()
    diff = compare_outputs({name: want.cpu().numpy()}, {name: got.cpu().numpy()})[name]
    rows = want.reshape(len(want), -1), got.reshape(len(got), -1)
    agree = float((rows[0].argmax(1) == rows[1].argmax(1)).float().mean())
    return {"output": name, "relative_difference": diff, "top1_agreement": agree}
