"""Errors that point at the prototxt: file, line, column, layer name and type."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


class CaffeAlexError(Exception):
    """A user-facing error. ``str()`` gives one line: ``file:line:col: layer 'x' (Type): message``.

    The CLI prints that line and exits with code 1; Python callers can read the parts.
    A bad value found in a batch also says where: ``item`` (its index along the batch axis)
    and ``label`` (the value), so the caller that knows the feed can name the record.
    """

    item: int | None = None
    label: float | None = None

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        column: int | None = None,
        layer: str | None = None,
        layer_type: str | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.column = column
        self.layer = layer
        self.layer_type = layer_type

    def location(self) -> str:
        parts = [p for p in (self.file, self.line, self.column) if p is not None]
        return ":".join(str(p) for p in parts)

    def __str__(self) -> str:
        prefix = []
        where = self.location()
        if where:
            prefix.append(where + ":")
        if self.layer is not None:
            kind = f" ({self.layer_type})" if self.layer_type else ""
            prefix.append(f"layer '{self.layer}'{kind}:")
        return " ".join(prefix + [self.message])


def raised_in_user_code(exc: BaseException, message: str, **where) -> None:
    """Make ``exc``, raised by a user's own code (a Python layer's method), ready to go on to
    the caller as it is, as pycaffe lets it through: a note saying where it was raised
    (``message``: which code, ``where``: CaffeAlexError's layer and layer_type), and the one
    line the command line prints for it instead of a traceback (``one_line``)."""
    error = CaffeAlexError(f"{message} raised {type(exc).__name__}: {describe(exc)}", **where)
    exc.caffe_alex_error = error
    note = f"(caffe-alex: in {message} of layer '{where.get('layer')}')"
    if hasattr(exc, "add_note"):  # Python 3.11+ shows notes under the traceback
        exc.add_note(note)
    else:
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]


def one_line(exc: BaseException) -> CaffeAlexError | None:
    """The one-line error the command line prints for ``exc``: itself for a CaffeAlexError, the
    error ``raised_in_user_code`` attached to a user's exception, else None."""
    if isinstance(exc, CaffeAlexError):
        return exc
    return getattr(exc, "caffe_alex_error", None)


class LayerConfigError(ValueError):
    """Raised inside a layer for a bad configuration or shape; the builder adds the location."""


@dataclass
class SourceMap:
    """Where each layer of a net definition starts, so build errors can name a line.

    ``index_lines[i]`` is the 1-based line of the block of ``net.layer[i]`` (of the upgraded
    net), so two layers sharing a name (a TRAIN and a TEST data layer) keep their own lines;
    ``layer_lines`` maps a name to the line of its first block; ``path`` is the file, if any.
    """

    path: str | None = None
    layer_lines: dict[str, int] = field(default_factory=dict)
    index_lines: list[int | None] = field(default_factory=list)

    def line_of(self, layer: str | None, index: int | None = None) -> int | None:
        if index is not None and index < len(self.index_lines) and self.index_lines[index]:
            return self.index_lines[index]
        return self.layer_lines.get(layer) if layer is not None else None

    def error(
        self,
        message: str,
        layer: str | None = None,
        layer_type: str | None = None,
        index: int | None = None,
    ):
        return CaffeAlexError(
            message,
            file=self.path,
            line=self.line_of(layer, index),
            layer=layer,
            layer_type=layer_type,
        )


@contextmanager
def reading(path) -> Iterator[None]:
    """Turn a failure to open or read ``path`` into one line naming it."""
    try:
        yield
    except FileNotFoundError:
        raise CaffeAlexError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CaffeAlexError(f"is a folder, not a file: {path}") from None
    except OSError as exc:
        raise CaffeAlexError(f"cannot read {path}: {exc.strerror or exc}") from None


_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def describe(exc: BaseException) -> str:
    """A library's exception as text for one of our one-line messages: the OS's reason for an
    OSError, bytes messages decoded, no Python object reprs, newlines collapsed."""
    if isinstance(exc, OSError) and exc.errno and exc.strerror:
        # the OS's reason: h5py puts its whole diagnostic in strerror, beside the errno
        text = os.strerror(exc.errno)
    elif isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    elif exc.args and isinstance(exc.args[0], (bytes, bytearray)):  # plyvel, lmdb
        text = bytes(exc.args[0]).decode("utf-8", "backslashreplace")
    else:
        text = str(exc)
    text = _OBJECT_REPR.sub("the data", text)
    return " ".join(text.split()) or type(exc).__name__
