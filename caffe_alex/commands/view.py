"""``caffe-alex draw`` (Caffe's python/draw_net.py) and ``caffe-alex summary``."""

from __future__ import annotations

import click

from ..formats.prototxt import read_net
from ..tools.draw import draw_net_to_file, output_format, shape_notes
from ..tools.summary import build_for_shapes, summarize, table_lines
from .options import input_shape_option, option, parse_input_shapes, phase_option, user_errors

_INPUT_SHAPE = input_shape_option()


@click.command()
@click.argument("net")
@click.argument("output")
@option("rankdir", type=click.Choice(["LR", "TB", "BT", "RL"], case_sensitive=False),
         default="LR", show_default=True, help="Direction of the layout.")  # fmt: skip
@phase_option("ALL", "Which phase's layers to draw.", ("TRAIN", "TEST", "ALL"))
@click.option("--display-lrm", "--display_lrm", "display_lrm", is_flag=True,
              help="Show the lr and decay multipliers of the learning layers.")  # fmt: skip
@click.option("--shapes", is_flag=True, help="Label each blob with its inferred shape.")
@_INPUT_SHAPE
@user_errors
def draw(net, output, rankdir, phase, display_lrm, shapes, input_shape) -> None:
    """Draw NET to OUTPUT (.png, .svg, .pdf, .jpg or .dot), like Caffe's draw_net.py."""
    output_format(output)
    net_param, source = read_net(net)
    phase = None if phase.upper() == "ALL" else phase.upper()
    notes = None
    if shapes:
        notes = shape_notes(net_param, phase, parse_input_shapes(input_shape), source)
    click.echo(f"Drawing net to {output}")
    draw_net_to_file(
        net_param, output, rankdir=rankdir.upper(), phase=phase, display_lrm=display_lrm,
        blob_notes=notes,
    )  # fmt: skip


@click.command()
@click.argument("net")
@phase_option("TEST")
@_INPUT_SHAPE
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
