"""``caffe-alex plot-log``: the curves of a training log (ours or Caffe's), and its tables."""

from __future__ import annotations

import os

import click

from ..errors import CaffeAlexError
from ..tools.plot_log import parse_log, plot
from ..tools.plot_log import write_csv as write_table
from ..tools.tensorboard import convert_log
from .options import user_errors


@click.command("plot-log")
@click.argument("log_file")
@click.argument("output", required=False)
@click.option(
    "--csv",
    "write_csv",
    is_flag=True,
    help="Also write OUTPUT's stem + .train / .test CSV tables (parse_log.py's rows).",
)
@click.option("--tensorboard", default=None, metavar="DIR",
              help="Also (or only) write the log's numbers as TensorBoard events into "
              "DIR.")  # fmt: skip
@user_errors
def plot_log(log_file, output, write_csv, tensorboard) -> None:
    """Draw the loss, accuracy and learning-rate curves of a training LOG_FILE (ours or
    Caffe's) into OUTPUT (.png, .svg, .pdf), and/or convert it to TensorBoard events."""
    if not output and not tensorboard:
        raise click.UsageError("give an OUTPUT image, --tensorboard DIR, or both")
    if write_csv and not output:
        raise click.UsageError("--csv names its tables after OUTPUT: give one")
    log = parse_log(log_file)
    if not (log.train or log.test or log.loss):
        raise CaffeAlexError(f"{log_file}: no training iterations found in the log")
    if tensorboard:
        path, count = convert_log(log_file, tensorboard)
        click.echo(f"{path}: {count} scalars")
    if not output:
        return
    plot(log, output, title=os.path.basename(log_file))
    click.echo(f"{output}: {len(log.train)} train rows, {len(log.test)} test rows")
    if write_csv:
        stem = os.path.splitext(output)[0]
        write_table(log.train, stem + ".train")
        write_table(log.test, stem + ".test")
