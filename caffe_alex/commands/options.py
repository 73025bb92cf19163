"""What the commands share: Caffe-spelled options, one-line errors, input shapes, devices."""

from __future__ import annotations

import functools
import os
import sys

import click

from ..errors import CaffeAlexError, describe
from ..log import get_logger


def option(name: str, **kwargs):
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
        except BrokenPipeError:  # the reader went away (e.g. `caffe-alex layers | head -1`):
            # point stdout at /dev/null so the final flush at exit cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except CaffeAlexError as exc:
            click.echo(f"caffe-alex: error: {exc}", err=True)
            sys.exit(1)
        except click.UsageError:
            raise  # a malformed command line: click's usage text and exit code 2
        except click.ClickException as exc:  # any other click error: our one-line form
            click.echo(f"caffe-alex: error: {exc.format_message()}", err=True)
            sys.exit(1)
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"caffe-alex: error: {where}{describe(exc)}", err=True)
            sys.exit(1)

    return wrapper


def phase_option(default: str = "TEST", help: str = "Net phase.", choices=("TRAIN", "TEST")):
    """``--phase`` / ``-phase``, case-insensitive."""
    return option("phase", type=click.Choice(list(choices), case_sensitive=False),
                  default=default, show_default=True, help=help)  # fmt: skip


def input_shape_option(help: str = "Declare an input's shape (e.g. data=32,3,227,227), for data "
                       "layers whose source is not at hand. Repeatable."):  # fmt: skip
    """``--input-shape NAME=D1,D2,...``, repeatable; parse with ``parse_input_shapes``."""
    return option("input-shape", multiple=True, metavar="NAME=D1,D2,...", help=help)


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
    """The torch device for a ``--gpu`` value (none/cpu, an id, a list, or all)."""
    import torch  # imported on use: the options are loaded by light commands too (~1.5 s)

    if gpu is None or gpu in ("", "none", "cpu"):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        get_logger().warning("no CUDA device available; using the CPU")
        return torch.device("cpu")
    index = 0 if gpu == "all" else int(gpu.split(",")[0])
    return torch.device("cuda", index)


def gpu_ids(spec: str | None) -> list[int]:
    """The GPUs a ``--gpu`` value names (Caffe's get_gpus), checked against this machine: [] for
    the CPU ('none', or no value), every device for 'all', else the listed ids. Without CUDA a
    single id falls back to the CPU with a warning (as resolve_device); 'all' or a list stops."""
    import torch  # imported on use: the options are loaded by light commands too (~1.5 s)

    spec = (spec or "").strip()
    if spec in ("", "none", "cpu"):
        return []
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if spec == "all":
        if not count:
            raise CaffeAlexError("--gpu all: no CUDA device is available (--gpu none trains on "
                                 "the CPU)")  # fmt: skip
        return list(range(count))
    try:
        ids = [int(part) for part in spec.split(",")]
    except ValueError:
        ids = [-1]
    if min(ids) < 0:
        raise CaffeAlexError(f"--gpu {spec}: expected GPU ids (0, or 0,1), 'all' or 'none'")
    if not count:
        if len(ids) == 1:
            get_logger().warning("no CUDA device available; using the CPU")
            return []
        raise CaffeAlexError(f"--gpu {spec}: no CUDA device is available (--gpu none trains on "
                             "the CPU)")  # fmt: skip
    missing = [i for i in ids if i >= count]
    if missing:
        raise CaffeAlexError(
            f"--gpu {spec}: there is no GPU {missing[0]}; this machine has {count} "
            f"(ids {', '.join(map(str, range(count)))})"
        )
    return ids
