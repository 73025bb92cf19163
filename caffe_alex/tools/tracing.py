"""Tracing a built Net whole with torch.export, for what needs the net as one graph: the ONNX
export (onnx_export.py), the PyTorch source export (torch_export.py) and the compiled inference
path (inference.py). Non-strict tracing: the layers' Python runs as usual and the graph records
the tensor operations; a failure names the layer that was running.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from ..errors import CaffeAlexError
from ..net import Net


class _Outputs(nn.Module):
    """The net with the blobs ``names`` as a tuple, in that order."""

    def __init__(self, net, names):
        super().__init__()
        self.net, self.names = net, list(names)

    def forward(self, *inputs):
        self.net(*inputs)
        return tuple(self.net.blobs[name] for name in self.names)


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


def example_inputs(net, dynamic_batch: bool) -> tuple[torch.Tensor, ...]:
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
def quiet_export():
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


def innermost_error(exc: BaseException) -> str:
    # torch wraps the real cause in a long explanation: report the innermost message.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def layer_error(where, message: str) -> CaffeAlexError:
    if where is None:
        return CaffeAlexError(message)
    return CaffeAlexError(message, layer=where[0], layer_type=where[1])


# Layer types whose tops' sizes depend on the values (the boxes kept): no traced graph holds them
DATA_SIZED = frozenset({"DetectionOutput", "Proposal"})


def trace_net(net, inputs, dynamic_batch: bool, outputs, what: str = "ONNX"):
    """torch.export of the net (non-strict: the Python of the layers runs as usual);
    ``what`` names the export in an error (ONNX, torch_export.py's PyTorch source,
    torch.compile)."""
    for name, kind in zip(net.layer_names, net.layer_types):
        if kind in DATA_SIZED:  # refused before tracing: the tracer's own error dumps a graph
            raise CaffeAlexError(
                f"cannot trace the net for {what}: the size of its output depends on the data; "
                "stop before it (export --outputs) or run without tracing (deploy --fast)",
                layer=name, layer_type=kind,
            )  # fmt: skip
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
        message = f"cannot export to {what}: {innermost_error(exc)}"
        raise layer_error(tracker.current, message) from exc
    finally:
        tracker.remove()
