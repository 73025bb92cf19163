"""The ``caffe-alex`` command line: a click group whose commands live in caffe_alex/commands/,
each a few lines over the library.

A command's module is imported only when that command runs (click's documented lazy-group
pattern), so ``caffe-alex --help`` and the light data tools start without loading torch.
Options take Caffe's spelling too (``-model``, ``-gpu``), so existing scripts keep working.
Errors print one line and exit with code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import sys

import click

from .errors import CaffeAlexError
from .formats.user_proto import use_proto
from .log import setup_logging

# command name -> "module under caffe_alex.commands:function", in the order --help lists them
COMMANDS = {
    "train": "train:train",
    "test": "train:test",
    "plot-log": "plot_log:plot_log",
    "time": "time:time",
    "upgrade": "upgrade:upgrade",
    "layers": "layers:list_layers",
    "convert": "weights:convert",
    "inspect": "weights:inspect",
    "export": "export:export",
    "convert-imageset": "data:convert_imageset",
    "convert-mnist": "data:convert_mnist",
    "compute-image-mean": "data:compute_image_mean",
    "db-info": "data:db_info",
    "convert-annoset": "data:convert_annoset",
    "draw": "draw:draw",
    "summary": "summary:summary",
    "deploy": "deploy:deploy",
    "extract-features": "deploy:extract_features",
    "compare": "compare:compare",
}


class LazyGroup(click.Group):
    """A group that imports a command's module when the command is looked up."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, name = target.partition(":")
        command = getattr(importlib.import_module(f"caffe_alex.commands.{module}"), name)
        command.name = cmd_name
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option(
    "--proto",
    metavar="CAFFE_PROTO",
    envvar="CAFFE_ALEX_PROTO",
    help="Your fork's caffe.proto: net and solver files are read with its field numbers.",
)
@click.version_option(package_name="caffe-alex")
def main(debug: bool, proto: str | None) -> None:
    """Read, run and train BVLC Caffe nets on PyTorch with Caffe's numbers."""
    setup_logging()
    if proto:
        _use_proto(proto, debug)


def _use_proto(path: str, debug: bool) -> None:
    try:
        use_proto(path)
    except CaffeAlexError as exc:  # the one-line form of every command's errors
        if debug:
            raise
        click.echo(f"caffe-alex: error: {exc}", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
