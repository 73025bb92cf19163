"""``caffe-alex draw``: the net's diagram, as Caffe's python/draw_net.py draws it."""

from __future__ import annotations

import click

from ..formats.prototxt import read_net
from ..tools.draw import draw_net_to_file, output_format, shape_notes
from .options import input_shape_option, option, parse_input_shapes, phase_option, user_errors


@click.command()
@click.argument("net")
@click.argument("output")
@option("rankdir", type=click.Choice(["LR", "TB", "BT", "RL"], case_sensitive=False),
         default="LR", show_default=True, help="Direction of the layout.")  # fmt: skip
@phase_option("ALL", "Which phase's layers to draw.", ("TRAIN", "TEST", "ALL"))
@click.option("--display-lrm", "--display_lrm", "display_lrm", is_flag=True,
              help="Show the lr and decay multipliers of the learning layers.")  # fmt: skip
@click.option("--shapes", is_flag=True, help="Label each blob with its inferred shape.")
@input_shape_option()
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
