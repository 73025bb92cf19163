"""Export a built Net (TEST phase) to ONNX, with inputs and outputs named after the Caffe blobs.

Uses torch's torch.export-based ONNX exporter (``dynamo=True``), not the TorchScript one
(``dynamo=False``): that one gives AlexNet wrong outputs (relative error 1; its trace of the LRN
Function's in-place window sum is the likely culprit).

Caffe's cross-channel LRN is emitted as ONNX's own ``LRN`` node, whose definition is Caffe's
ACROSS_CHANNELS formula: y = x / (bias + alpha / size * window_sum(x^2))^beta with the
window [c - (size-1)/2, c + (size-1)/2] (size is odd in Caffe) clipped at the edges, and bias
is Caffe's ``k``.

Fork layers: most trace to plain ONNX operators (Permute: Transpose, ReLU6: Clip,
ShuffleChannel and Reorg: Reshape + Transpose, depthwise convolutions: Conv with groups, BN and
Normalize: arithmetic, Interp and Upsample: gathers and expands that give the layer's exact
values). ROIPooling becomes ONNX's ``MaxRoiPool``, whose definition is Fast R-CNN's (corners
rounded half away from zero after scaling, bins floor/ceil of the roi size / pooled size, empty
bins 0); a roi's batch index is not range-checked there as the layer does. PriorBox depends on
its bottoms' shapes only, so its output is computed once and stored as a constant. Layers whose
output size depends on the data (DetectionOutput, Proposal) have no ONNX operator that computes
what the fork does: the export stops naming them, and ``outputs`` exports the blobs before
them instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..layers.lrn import LRNLayer, cross_channel_lrn
from ..layers.roi import ROIPoolingLayer
from ..net import Net

# 18 is the lowest opset the torch.export-based exporter writes natively; lower ones go
# through onnx's version converter.
DEFAULT_OPSET = 18


@torch.library.custom_op("caffe_alex::lrn_across_channels", mutates_args=())
def lrn_across_channels(
    x: torch.Tensor, size: int, alpha: float, beta: float, k: float
) -> torch.Tensor:
    """Caffe's cross-channel LRN as one opaque op, so the exporter can map it to ONNX's LRN
    (tracing the layer's own Function would record its in-place slice additions instead)."""
    return cross_channel_lrn(x, size, alpha, beta, k)


@lrn_across_channels.register_fake
def _lrn_shape(x, size, alpha, beta, k):
    return torch.empty_like(x)


_LRN_OP = torch.ops.caffe_alex.lrn_across_channels.default


def _lrn_to_onnx(x, size: int, alpha: float, beta: float, k: float):
    from onnxscript import opset18 as op  # imported on use: the optional onnx extra

    return op.LRN(x, size=size, alpha=alpha, beta=beta, bias=k)


@torch.library.custom_op("caffe_alex::roi_max_pool", mutates_args=())
def roi_max_pool(
    x: torch.Tensor, rois: torch.Tensor, pooled_h: int, pooled_w: int, spatial_scale: float
) -> torch.Tensor:
    """Fast R-CNN's ROIPooling as one opaque op, so the exporter can map it to ONNX's
    MaxRoiPool (its own gathers have a data-dependent window size that cannot be traced)."""
    settings = SimpleNamespace(name="ROIPooling", type_name="ROIPooling", pooled_h=pooled_h,
                               pooled_w=pooled_w, spatial_scale=spatial_scale)  # fmt: skip
    return ROIPoolingLayer.forward(settings, x, rois)  # the layer's own computation


@roi_max_pool.register_fake
def _roi_shape(x, rois, pooled_h, pooled_w, spatial_scale):
    return x.new_empty((rois.shape[0], x.shape[1], pooled_h, pooled_w))


def _roi_pool_to_onnx(x, rois, pooled_h: int, pooled_w: int, spatial_scale: float):
    from onnxscript import opset18 as op  # imported on use: the optional onnx extra

    return op.MaxRoiPool(x, rois, pooled_shape=[pooled_h, pooled_w], spatial_scale=spatial_scale)


_ROI_OP = torch.ops.caffe_alex.roi_max_pool.default

# Layer types no ONNX operator computes as the fork does, and what they do.
NOT_IN_ONNX = {
    "DetectionOutput": "SSD's box decoding, per-class NMS and keep_top_k",
    "Proposal": "py-faster-rcnn's anchor decoding and NMS",
}
# Layer types whose output depends only on their bottoms' shapes: exported as constants.
SHAPE_ONLY = frozenset({"PriorBox"})


@contextlib.contextmanager
def _onnx_forms(net, inputs):
    """While the net is traced: cross-channel LRN layers call the opaque LRN op, ROIPooling
    layers the opaque MaxRoiPool op, and shape-only layers return their output as computed
    from ``inputs`` (one eager pass)."""
    lrn = [m for m in net.layers.values() if isinstance(m, LRNLayer)]
    patched = []
    constants = _shape_only_outputs(net, inputs)
    for step in net.steps:
        layer = net.layers[step.key]
        if step.layer in constants:
            values = constants[step.layer]
            layer.forward = lambda *bottoms, v=values: v
            patched.append(layer)
        elif isinstance(layer, ROIPoolingLayer):
            layer.forward = lambda x, rois, m=layer: roi_max_pool(
                x, rois.reshape(-1, 5), m.pooled_h, m.pooled_w, m.spatial_scale
            )
            patched.append(layer)
    for layer in lrn:
        layer.cross_channel = lrn_across_channels
    try:
        yield
    finally:
        for layer in lrn:
            layer.cross_channel = cross_channel_lrn
        for layer in patched:
            del layer.forward  # the class's forward again


def _shape_only_outputs(net, inputs) -> dict[str, torch.Tensor | tuple[torch.Tensor, ...]]:
    names = {step.layer: step for step in net.steps
             if net.layer_types[net.layer_names.index(step.layer)] in SHAPE_ONLY}  # fmt: skip
    if not names:
        return {}
    with torch.no_grad():
        net(*inputs)
    found = {}
    for name, step in names.items():
        tops = tuple(net.blobs[t].detach().clone() for t in step.tops)
        found[name] = tops[0] if len(tops) == 1 else tops
    return found


@dataclass
class ExportResult:
    path: str
    inputs: list[str]
    outputs: list[str]
    opset: int
    seconds: float
    size_bytes: int


class _Outputs(nn.Module):
    """The net with the blobs ``names`` as a tuple, in that order."""

    def __init__(self, net, names):
        super().__init__()
        self.net, self.names = net, list(names)

    def forward(self, *inputs):
        self.net(*inputs)
        return tuple(self.net.blobs[name] for name in self.names)


def _check_net(net, outputs) -> None:
    if net.phase != "TEST":
        raise CaffeAlexError(f"ONNX export needs a TEST-phase net, got {net.phase}")
    if not net.input_names:
        raise CaffeAlexError("the net has no inputs (Input or data layers) to export")
    if not outputs:
        raise CaffeAlexError("the net has no output blobs to export")
    clash = sorted(set(net.input_names) & set(outputs))
    if clash:
        raise CaffeAlexError(f"blob(s) {clash} are both input and output: nothing to export")
    for step, kind in zip(net.steps, net.layer_types):
        if kind in NOT_IN_ONNX:
            raise net.source.error(
                f"cannot export to ONNX: no ONNX operator does {NOT_IN_ONNX[kind]}; export the "
                f"blobs it reads with --outputs {','.join(step.bottoms)} and run it after the "
                "model",
                step.layer,
                kind,
            )


def net_up_to(net, outputs) -> Net:
    """A copy of ``net`` with only the layers its blobs ``outputs`` need (the last writer of
    each, back to the inputs), sharing nothing with it: weights are copied. The inputs no kept
    layer reads are dropped."""
    unknown = [name for name in outputs if name not in net.blob_shapes]
    if unknown:
        raise CaffeAlexError(f"--outputs: the net has no blob named '{unknown[0]}'")
    needed, kept = set(outputs), []
    for layer in reversed(net.net_param.layer):
        if needed & set(layer.top):
            kept.append(layer)
            needed = (needed - set(layer.top)) | set(layer.bottom)
    param = type(net.net_param)()
    param.CopyFrom(net.net_param)
    del param.layer[:]
    param.layer.extend(reversed(kept))
    shapes = {name: net.blob_shapes[name] for name in net.input_names}
    pruned = Net(param, net.phase, input_shapes=shapes, source=net.source)
    reference = next(net.parameters(), None)
    if reference is not None:
        pruned.to(device=reference.device, dtype=reference.dtype)
    with torch.no_grad():
        for name, blobs in pruned.params.items():
            for mine, theirs in zip(blobs, net.params[name]):
                mine.copy_(theirs)
    return pruned


def _example_inputs(net, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
    param = next(net.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    examples = []
    for name in net.input_names:
        shape = list(net.blob_shapes[name])
        if dynamic_batch and shape and shape[0] < 2:
            shape[0] = 2  # torch.export takes a size of 0 or 1 for a constant
        examples.append(torch.zeros(shape, dtype=dtype, device=device))
    return tuple(examples)


class _LayerTracker:
    """Remembers which layer was running when tracing failed, to name it in the error."""

    def __init__(self, net):
        self.current = None
        self.handles = []
        for name, kind in zip(net.layer_names, net.layer_types, strict=True):
            layer = net.layer(name)
            self.handles.append(layer.register_forward_pre_hook(self._enter(name, kind)))
            self.handles.append(layer.register_forward_hook(self._leave))

    def _enter(self, name, kind):
        def hook(module, args):
            self.current = (name, kind)

        return hook

    def _leave(self, module, args, output):
        self.current = None

    def remove(self):
        for handle in self.handles:
            handle.remove()


@contextlib.contextmanager
def _quiet():
    """The exporter warns about things that do not concern the user (blobs kept on the net,
    optional torchvision ops, deprecations): keep those out of the command's output."""
    # symbolic_shapes prints a whole graph when a layer's sizes depend on the data; onnx_ir's
    # optimizer notes the constants (PriorBox) it leaves as they are
    names = ("torch.onnx", "torch.fx.experimental.symbolic_shapes", "onnx_ir", "onnxscript")
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _innermost(exc: BaseException) -> str:
    # torch wraps the real cause in a long explanation: report the innermost message.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _layer_of_node(net, program, exc: BaseException) -> tuple[str, str] | None:
    """The layer whose code produced the graph node named in a conversion error."""
    match = None
    while exc is not None and match is None:
        match = re.search(r"translating node %(\w+)", str(exc))
        exc = exc.__cause__
    if match is None:
        return None
    keys = {key: name for name in net.layer_names for key, m in net.layers.items()
            if m is net.layer(name)}  # fmt: skip
    for node in program.graph.nodes:
        if node.name == match.group(1):
            for path, _ in reversed(list(node.meta.get("nn_module_stack", {}).values())):
                name = keys.get(path.rsplit(".", 1)[-1]) if "layers" in path else None
                if name is not None:
                    return name, net.layer_types[net.layer_names.index(name)]
    return None


def _fail(where, message: str) -> CaffeAlexError:
    if where is None:
        return CaffeAlexError(message)
    return CaffeAlexError(message, layer=where[0], layer_type=where[1])


def _trace(net, inputs, dynamic_batch: bool, outputs, what: str = "ONNX"):
    """torch.export of the net (non-strict: the Python of the layers runs as usual);
    ``what`` names the export in an error (ONNX, or torch_export.py's PyTorch source)."""
    wrapper = _Outputs(net, outputs)
    dynamic = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic = (tuple({0: batch} for _ in inputs),)
    tracker = _LayerTracker(net)
    try:
        return torch.export.export(wrapper, inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:
        if dynamic_batch and "specialized it to be a constant" in str(exc):
            raise CaffeAlexError(
                f"--dynamic-batch: the net fixes the batch size to {inputs[0].shape[0]} (a "
                "layer computes sizes from it, e.g. Reshape with explicit dims); export "
                "without it, or with --input-shape for the batch you need"
            ) from exc
        raise _fail(tracker.current, f"cannot export to {what}: {_innermost(exc)}") from exc
    finally:
        tracker.remove()


def _name_io(model, inputs: list[str], outputs: list[str]) -> None:
    """Name the graph's inputs and outputs after the blobs. The exporter names other values
    after their torch operation ('permute', 'cat'), which a Caffe blob may be called too: such
    a value is renamed first, or the graph would hold two values of one name."""
    graph = model.graph
    ends = {id(v) for v in (*graph.inputs, *graph.outputs)}
    values = [*graph.inputs, *graph.initializers.values()]
    values += [v for node in graph for v in node.outputs]
    taken = {v.name for v in values} | set(inputs) | set(outputs)
    for value in values:
        if id(value) not in ends and value.name in set(inputs) | set(outputs):
            n = 1
            while f"{value.name}_{n}" in taken:
                n += 1
            value.name = f"{value.name}_{n}"
            taken.add(value.name)
    for value, name in (*zip(graph.inputs, inputs), *zip(graph.outputs, outputs)):
        value.name = name


def to_onnx_model(net, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, outputs=None):
    """The net as a checked ``onnx.ModelProto`` (inputs and outputs named after the blobs).
    ``outputs`` (blob names) exports only the layers those blobs need, with them as the
    outputs; by default the net's own outputs."""
    onnx = _import_onnx()
    if outputs:
        net = net_up_to(net, outputs)
    outputs = list(outputs or net.output_names)
    _check_net(net, outputs)
    inputs = _example_inputs(net, dynamic_batch)
    was_training = net.training
    net.eval()
    try:
        with _quiet(), _onnx_forms(net, inputs):
            program = _trace(net, inputs, dynamic_batch, outputs)
            return _checked_model(onnx, net, program, opset, outputs)
    finally:
        net.train(was_training)
        net.blobs, net.loss = {}, None  # drop traced values


def _import_onnx():
    """The onnx module, or a one-line error naming the package of the onnx extra missing."""
    try:
        # imported on use: the optional onnx extra, and a heavy import (~1 s)
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise CaffeAlexError(
            f"ONNX export needs the '{exc.name}' package: pip install 'caffe-alex[onnx]'"
        ) from None
    return onnx


def _checked_model(onnx, net, program, opset: int, outputs: list[str]):
    """The traced ``program`` translated to ONNX, its inputs and outputs named after the
    blobs, checked by onnx; a failure names the layer it comes from where it can."""
    try:
        onnx_program = torch.onnx.export(
            program,
            opset_version=opset,
            custom_translation_table={_LRN_OP: _lrn_to_onnx, _ROI_OP: _roi_pool_to_onnx},
            external_data=False,
            verbose=False,
        )
        _name_io(onnx_program.model, list(net.input_names), outputs)
        model = onnx_program.model_proto
        onnx.checker.check_model(model)
    except Exception as exc:
        where = _layer_of_node(net, program, exc)
        raise _fail(where, f"cannot export to ONNX: {_innermost(exc)}") from exc
    return model


def write_model_atomic(model, path: str) -> int:
    """Serialize ``model`` to ``path`` atomically (see formats.atomic.atomic_path)."""
    data = model.SerializeToString()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return len(data)


def export_onnx(
    net, path: str, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False, outputs=None
) -> ExportResult:
    """Write ``net`` as an ONNX model at ``path``; see ``to_onnx_model``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CaffeAlexError(f"cannot write {path}: folder {folder} does not exist")
    start = time.perf_counter()
    model = to_onnx_model(net, opset=opset, dynamic_batch=dynamic_batch, outputs=outputs)
    try:
        size = write_model_atomic(model, path)
    except OSError as exc:
        raise CaffeAlexError(f"cannot write {path}: {exc.strerror or exc}") from None
    return ExportResult(
        path,
        [value.name for value in model.graph.input],
        [value.name for value in model.graph.output],
        opset,
        time.perf_counter() - start,
        size,
    )
