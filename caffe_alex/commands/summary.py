"""``caffe-alex summary``: layers with top shapes, parameters, multiply-adds and memory."""

from __future__ import annotations

import click

from ..formats.prototxt import read_net
from ..tools.summary import build_for_shapes, summarize, table_lines
from .options import input_shape_option, parse_input_shapes, phase_option, user_errors


@click.command()
@click.argument("net")
@phase_option("TEST")
@input_shape_option()
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Set the first axis (batch size) of every input to N.")  # fmt: skip
@user_errors
def summary(net, phase, input_shape, batch) -> None:
    """Print NET's layers with top shapes, parameters, multiply-adds and activation memory."""
    net_param, source = read_net(net)
    shapes = parse_input_shapes(input_shape)
    built = build_for_shapes(net_param, phase.upper(), input_shapes=shapes, source=source)
    if batch is not None:
        built.reshape(**{n: (batch, *built.blob_shapes[n][1:]) for n in built.input_names})
    for line in table_lines(summarize(built)):
        click.echo(line)
