"""``caffe-alex time``: per-layer forward and backward times, as ``caffe time``."""

from __future__ import annotations

import click

from ..log import get_logger
from ..net import Net
from ..solvers.devices import choose_device
from ..tools.timing import report_lines, time_net
from .options import (
    input_shape_option,
    option,
    parse_input_shapes,
    phase_option,
    user_errors,
)


@click.command()
@option("model", required=True, help="Net definition.")
@option("iterations", type=int, default=50, show_default=True, help="Iterations to time.")
@option("gpu", default=None, help="GPU id to run on (default: CPU).")
@phase_option("TRAIN")
@option("level", type=int, default=0, help="Net state level.")
@option("stage", default="", help="Comma-separated net state stages.")
@input_shape_option()
@option("weights", default=None, help="Trained weights to load first (comma-separated list).")
@user_errors
def time(model, iterations, gpu, phase, level, stage, input_shape, weights) -> None:
    """Time the forward and backward pass of MODEL, per layer, like ``caffe time``."""
    log = get_logger().info
    device = choose_device(gpu)
    log("Use CPU." if device.type == "cpu" else f"Use GPU with device ID {device.index}")
    stages = [s for s in stage.split(",") if s]
    shapes = parse_input_shapes(input_shape)
    net = Net.from_prototxt(model, phase.upper(), level=level, stages=stages, input_shapes=shapes)
    if weights:
        net.load_weights(weights)
    report = time_net(net, iterations, device, log=log)
    for line in report_lines(report):
        log(line)
    log("*** Benchmark ends ***")
