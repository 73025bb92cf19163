"""What the commands share: Caffe-spelled options, one-line errors, input shapes (the device
choice is solvers/devices.py's)."""

from __future__ import annotations

import functools
import os
import sys

import click

from ..errors import describe, one_line


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
        except click.UsageError:
            raise  # a malformed command line: click's usage text and exit code 2
        except Exception as exc:
            line = error_line(exc)
            if line is None:
                raise
            click.echo(f"caffe-alex: error: {line}", err=True)
            sys.exit(1)

    return wrapper


def error_line(exc: BaseException) -> str | None:
    """The one line a command prints for ``exc``: a CaffeAlexError, a Python layer's own
    exception (its attached line), any click error but a usage error, an OSError (missing
    files); None for anything else (a bug: its traceback shows)."""
    error = one_line(exc)
    if error is not None:
        return str(error)
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{describe(exc)}"
    return None


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


