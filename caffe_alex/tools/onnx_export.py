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
import os
import re
import time
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..layers.lrn import LRNLayer, cross_channel_lrn
from ..layers.roi import ROIPoolingLayer
from .tracing import (
    example_inputs,
    innermost_error,
    layer_error,
    net_up_to,
    quiet_export,
    trace_net,
)

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
    inputs = example_inputs(net, dynamic_batch)
    was_training = net.training
    net.eval()
    try:
        with quiet_export(), _onnx_forms(net, inputs):
            program = trace_net(net, inputs, dynamic_batch, outputs)
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
        raise layer_error(where, f"cannot export to ONNX: {innermost_error(exc)}") from exc
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
