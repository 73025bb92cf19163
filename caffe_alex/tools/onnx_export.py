"""Export a built Net (TEST phase) to ONNX, with inputs and outputs named after the Caffe blobs.

Uses torch's torch.export-based ONNX exporter (``dynamo=True``), not the TorchScript one
(``dynamo=False``): that one gives AlexNet wrong outputs (relative error 1; its trace of the LRN
Function's in-place window sum is the likely culprit).

Caffe's cross-channel LRN is emitted as ONNX's own ``LRN`` node, whose definition is Caffe's
ACROSS_CHANNELS formula: y = x / (bias + alpha / size * window_sum(x^2))^beta with the
window [c - (size-1)/2, c + (size-1)/2] (size is odd in Caffe) clipped at the edges, and bias
is Caffe's ``k``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CaffeAlexError
from ..formats.atomic import atomic_path
from ..layers.lrn import LRNLayer, cross_channel_lrn

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


@contextlib.contextmanager
def _lrn_as_onnx_op(net):
    """While the net is traced, its cross-channel LRN layers call the opaque op above."""
    layers = [m for m in net.layers.values() if isinstance(m, LRNLayer)]
    for layer in layers:
        layer.cross_channel = lrn_across_channels
    try:
        yield
    finally:
        for layer in layers:
            layer.cross_channel = cross_channel_lrn


@dataclass
class ExportResult:
    path: str
    inputs: list[str]
    outputs: list[str]
    opset: int
    seconds: float
    size_bytes: int


class _Outputs(nn.Module):
    """The net with its output blobs as a tuple in ``net.output_names`` order."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, *inputs):
        blobs = self.net(*inputs)
        return tuple(blobs[name] for name in self.net.output_names)


def _check_net(net) -> None:
    if net.phase != "TEST":
        raise CaffeAlexError(f"ONNX export needs a TEST-phase net, got {net.phase}")
    if not net.input_names:
        raise CaffeAlexError("the net has no inputs (Input or data layers) to export")
    if not net.output_names:
        raise CaffeAlexError("the net has no output blobs to export")
    clash = sorted(set(net.input_names) & set(net.output_names))
    if clash:
        raise CaffeAlexError(f"blob(s) {clash} are both input and output: nothing to export")


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
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
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


def _trace(net, inputs, dynamic_batch: bool):
    """torch.export of the net (non-strict: the Python of the layers runs as usual)."""
    wrapper = _Outputs(net)
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
        raise _fail(tracker.current, f"cannot export to ONNX: {_innermost(exc)}") from exc
    finally:
        tracker.remove()


def to_onnx_model(net, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False):
    """The net as a checked ``onnx.ModelProto`` (inputs and outputs named after the blobs)."""
    try:
        # imported on use: the optional onnx extra, and a heavy import (~1 s)
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's exporter needs it)
    except ImportError as exc:
        raise CaffeAlexError(
            f"ONNX export needs the '{exc.name}' package: pip install 'caffe-alex[onnx]'"
        ) from None

    _check_net(net)
    inputs = _example_inputs(net, dynamic_batch)
    was_training = net.training
    net.eval()
    try:
        with _quiet(), _lrn_as_onnx_op(net):
            program = _trace(net, inputs, dynamic_batch)
            try:
                onnx_program = torch.onnx.export(
                    program,
                    input_names=list(net.input_names),
                    output_names=list(net.output_names),
                    opset_version=opset,
                    custom_translation_table={_LRN_OP: _lrn_to_onnx},
                    external_data=False,
                    verbose=False,
                )
                model = onnx_program.model_proto
                onnx.checker.check_model(model)
            except Exception as exc:
                where = _layer_of_node(net, program, exc)
                raise _fail(where, f"cannot export to ONNX: {_innermost(exc)}") from exc
    finally:
        net.train(was_training)
        net.blobs, net.loss = {}, None  # drop traced values
    return model


def write_model_atomic(model, path: str) -> int:
    """Serialize ``model`` to ``path`` atomically (see formats.atomic.atomic_path)."""
    data = model.SerializeToString()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return len(data)


def export_onnx(
    net, path: str, *, opset: int = DEFAULT_OPSET, dynamic_batch: bool = False
) -> ExportResult:
    """Write ``net`` as an ONNX model at ``path``; see ``to_onnx_model``."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CaffeAlexError(f"cannot write {path}: folder {folder} does not exist")
    start = time.perf_counter()
    model = to_onnx_model(net, opset=opset, dynamic_batch=dynamic_batch)
    try:
        size = write_model_atomic(model, path)
    except OSError as exc:
        raise CaffeAlexError(f"cannot write {path}: {exc.strerror or exc}") from None
    return ExportResult(
        path,
        list(net.input_names),
        list(net.output_names),
        opset,
        time.perf_counter() - start,
        size,
    )
