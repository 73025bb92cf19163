"""``caffe-alex export``: a net definition (and its weights) as an ONNX model."""

from __future__ import annotations

import click

from ..log import get_logger
from ..net import Net
from ..tools.inference import for_inference
from ..tools.onnx_export import DEFAULT_OPSET, export_onnx
from .options import input_shape_option, option, parse_input_shapes, user_errors


@click.command()
@option("model", required=True, help="Net definition (deploy prototxt), built in TEST phase.")
@option("weights", default=None, help="Trained weights (.caffemodel); comma-separated list ok.")
@option("opset", type=int, default=None, help="ONNX opset version [default: 18].")
@option("dynamic-batch", is_flag=True, help="Let the batch axis (axis 0 of inputs) vary.")
@option("fast", is_flag=True, help="Fold BatchNorm/Scale into the convolutions first (the "
        "inference fast path: within 1e-5 of Caffe's numbers).")  # fmt: skip
@input_shape_option("Declare an input's shape (e.g. data=1,3,227,227). Repeatable.")
@click.argument("output")
@user_errors
def export(model, weights, opset, dynamic_batch, fast, input_shape, output) -> None:
    """Write MODEL (with --weights) as the ONNX model OUTPUT; inputs and outputs keep the
    Caffe blob names. Without --weights the layers keep their fillers' values."""
    net = Net.from_prototxt(model, "TEST", input_shapes=parse_input_shapes(input_shape))
    if weights:
        net.load_weights(weights)  # logs what it copied and which layers it lacked
    if fast:
        net = for_inference(net, channels_last=False, copy_net=False)
    result = export_onnx(net, output, opset=opset or DEFAULT_OPSET, dynamic_batch=dynamic_batch)
    get_logger().info(
        f"Wrote {result.path} (opset {result.opset}, {result.size_bytes / 2**20:.1f} MiB, "
        f"{result.seconds:.1f} s): inputs {result.inputs}, outputs {result.outputs}"
    )
