"""``caffe-alex export``: a net definition (and its weights) as an ONNX model, or as plain
PyTorch source and a state dict (``--torch``)."""

from __future__ import annotations

import click

from ..log import get_logger
from ..net import Net
from ..tools.inference import for_inference
from ..tools.onnx_export import DEFAULT_OPSET, export_onnx
from ..tools.torch_export import export_torch
from .options import input_shape_option, option, parse_input_shapes, user_errors


@click.command()
@option("model", required=True, help="Net definition (deploy prototxt), built in TEST phase.")
@option("weights", default=None, help="Trained weights (.caffemodel); comma-separated list ok.")
@option("opset", type=int, default=None, help="ONNX opset version [default: 18].")
@option("dynamic-batch", is_flag=True, help="Let the batch axis (axis 0 of inputs) vary.")
@input_shape_option("Declare an input's shape (e.g. data=1,3,227,227). Repeatable.")
@option("outputs", default=None, metavar="BLOB,...", help="Export only what these blobs need, "
         "with them as the outputs (e.g. the bottoms of a DetectionOutput layer).")  # fmt: skip
@option("fast", is_flag=True, help="Fold BatchNorm/Scale into the convolutions first (the "
        "inference fast path: within 1e-5 of Caffe's numbers; ONNX only).")  # fmt: skip
@click.option("--torch", "as_torch", is_flag=True, help="Write OUTPUT (a .py) as plain PyTorch "
              "source, runnable with torch alone, and the weights beside it (.pt).")  # fmt: skip
@click.argument("output")
@user_errors
def export(model, weights, opset, dynamic_batch, input_shape, outputs, fast, as_torch,
           output) -> None:  # fmt: skip
    """Write MODEL (with --weights) as the ONNX model OUTPUT, or with --torch as PyTorch source
    and a state dict; inputs and outputs keep the Caffe blob names. Without --weights the
    layers keep their fillers' values."""
    net = Net.from_prototxt(model, "TEST", input_shapes=parse_input_shapes(input_shape))
    if weights:
        net.load_weights(weights)  # logs what it copied and which layers it lacked
    names = [name for name in (outputs or "").split(",") if name] or None
    if fast and as_torch:
        raise click.UsageError("--fast folds the net for ONNX; --torch writes it as Caffe has it")
    if fast:
        net = for_inference(net, channels_last=False, keep=names or (), copy_net=False)
    if as_torch:
        written = export_torch(net, output, dynamic_batch=dynamic_batch, outputs=names)
        get_logger().info(f"Wrote {written.source} and {written.weights}: inputs "
                          f"{written.inputs}, outputs {written.outputs}")  # fmt: skip
        return
    result = export_onnx(net, output, opset=opset or DEFAULT_OPSET, dynamic_batch=dynamic_batch,
                         outputs=names)  # fmt: skip
    get_logger().info(
        f"Wrote {result.path} (opset {result.opset}, {result.size_bytes / 2**20:.1f} MiB, "
        f"{result.seconds:.1f} s): inputs {result.inputs}, outputs {result.outputs}"
    )
