"""The ``caffe-alex`` command line: a click group, each command a few lines over the library.

Options take Caffe's spelling too (``-model``, ``-gpu``), so existing scripts keep working.
Errors print one line and exit with code 1; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import functools
import sys

import click

from .errors import CaffeAlexError
from .log import get_logger, setup_logging


def _option(name: str, **kwargs):
    """An option accepted as ``--name`` and as Caffe's ``-name``."""
    return click.option(f"--{name}", f"-{name}", name.replace("-", "_"), **kwargs)


def user_errors(fn):
    """Turn CaffeAlexError (and missing files) into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if click.get_current_context().find_root().params.get("debug"):
            return fn(*args, **kwargs)
        try:
            return fn(*args, **kwargs)
        except (CaffeAlexError, OSError) as exc:
            click.echo(f"caffe-alex: error: {exc}", err=True)
            sys.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.version_option(package_name="caffe-alex")
def main(debug: bool) -> None:
    """Read, run and train BVLC Caffe nets on PyTorch with Caffe's numbers."""
    setup_logging()


@main.command()
@click.argument("source")
@click.argument("destination")
@user_errors
def upgrade(source: str, destination: str) -> None:
    """Rewrite a legacy net or solver SOURCE in the current format as DESTINATION.

    Like Caffe's upgrade_net_proto_text / upgrade_solver_proto_text.
    """
    from .upgrade import upgrade_file

    upgrade_file(source, destination)


def phase_option(default: str = "TEST", help: str = "Net phase.", choices=("TRAIN", "TEST")):
    """``--phase`` / ``-phase``, case-insensitive."""
    return _option("phase", type=click.Choice(list(choices), case_sensitive=False),
                   default=default, show_default=True, help=help)  # fmt: skip


def input_shape_option(help: str = "Declare an input's shape (e.g. data=32,3,227,227), for data "
                       "layers whose source is not at hand. Repeatable."):  # fmt: skip
    """``--input-shape NAME=D1,D2,...``, repeatable; parse with ``parse_input_shapes``."""
    return _option("input-shape", multiple=True, metavar="NAME=D1,D2,...", help=help)


def parse_input_shapes(values: tuple[str, ...]) -> dict[str, tuple[int, ...]]:
    """``data=32,3,227,227`` (repeatable) -> {"data": (32, 3, 227, 227)}."""
    shapes = {}
    for value in values:
        name, _, dims = value.partition("=")
        try:
            shapes[name.strip()] = tuple(int(d) for d in dims.split(","))
        except ValueError:
            raise click.BadParameter(f"expected NAME=D1,D2,... got {value!r}") from None
        if not name.strip() or not dims:
            raise click.BadParameter(f"expected NAME=D1,D2,... got {value!r}")
    return shapes


def resolve_device(gpu: str | None):
    import torch

    if gpu is None or gpu in ("", "none", "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        get_logger().warning("no CUDA device available; using the CPU")
        return torch.device("cpu")
    index = 0 if gpu == "all" else int(gpu.split(",")[0])
    return torch.device("cuda", index)


@main.command()
@_option("model", required=True, help="Net definition.")
@_option("iterations", type=int, default=50, show_default=True, help="Iterations to time.")
@_option("gpu", default=None, help="GPU id to run on (default: CPU).")
@phase_option("TRAIN")
@_option("level", type=int, default=0, help="Net state level.")
@_option("stage", default="", help="Comma-separated net state stages.")
@input_shape_option()
@_option("weights", default=None, help="Trained weights to load first (comma-separated list).")
@user_errors
def time(model, iterations, gpu, phase, level, stage, input_shape, weights) -> None:
    """Time the forward and backward pass of MODEL, per layer, like ``caffe time``."""
    from .net import Net
    from .timing import report_lines, time_net

    log = get_logger().info
    device = resolve_device(gpu)
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


@main.command("layers")
def list_layers() -> None:
    """List the Caffe layer types this build supports."""
    from .registry import layer_types

    for name in layer_types():
        click.echo(name)


from . import commands  # noqa: E402,F401  (registers the commands of caffe_alex/commands/)

if __name__ == "__main__":
    main()
