"""``caffe-alex draw``: the net's diagram, as Caffe's python/draw_net.py draws it."""

from __future__ import annotations

import click

from ..formats.prototxt import read_net
from ..tools.draw import draw_net_to_file, output_format, shape_notes, state_net
from ..tools.html_view import html_page, is_html, write_page
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
@option("level", type=int, default=0, help="Net state level (with --phase TRAIN or TEST, or in "
        "the .html page's views).")  # fmt: skip
@option("stage", default="", help="Net state stages, separated by ','.")
@option("weights", default=None, help=".html: show statistics of these weights (comma-separated "
        "files) for each parameter blob.")  # fmt: skip
@user_errors
def draw(net, output, rankdir, phase, display_lrm, shapes, input_shape, level, stage,
         weights) -> None:  # fmt: skip
    """Draw NET to OUTPUT (.png, .svg, .pdf, .jpg or .dot), like Caffe's draw_net.py; or to an
    interactive page (.html) that describes each layer and blob when clicked."""
    stages = [s for s in stage.split(",") if s]
    if is_html(output):
        _draw_html(net, output, rankdir, phase, display_lrm, shapes, input_shape, level, stages,
                   weights)  # fmt: skip
        return
    if weights:
        raise click.UsageError("--weights is for an .html page")
    output_format(output)
    net_param, source = read_net(net)
    phase = None if phase.upper() == "ALL" else phase.upper()
    if phase and (level or stages):  # the net of this state, drawn whole
        net_param = state_net(net_param, phase, level, stages)
        phase = None
    notes = None
    if shapes:
        notes = shape_notes(net_param, phase, parse_input_shapes(input_shape), source)
    click.echo(f"Drawing net to {output}")
    draw_net_to_file(
        net_param, output, rankdir=rankdir.upper(), phase=phase, display_lrm=display_lrm,
        blob_notes=notes,
    )  # fmt: skip


def _draw_html(net, output, rankdir, phase, display_lrm, shapes, input_shape, level, stages,
               weights) -> None:  # fmt: skip
    net_param, source = read_net(net)
    phase = None if phase.upper() == "ALL" else phase.upper()
    click.echo(f"Drawing net to {output}")
    page = html_page(net_param, phase=phase, level=level, stages=stages, rankdir=rankdir.upper(),
                     display_lrm=display_lrm, label_shapes=shapes, source=source,
                     input_shapes=parse_input_shapes(input_shape), weights=weights)  # fmt: skip
    write_page(page, output)
