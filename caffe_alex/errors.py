"""Errors that point at the prototxt: file, line, column, layer name and type."""

from __future__ import annotations

from dataclasses import dataclass, field


class CaffeAlexError(Exception):
    """A user-facing error. ``str()`` gives one line: ``file:line:col: layer 'x' (Type): message``.

    The CLI prints that line and exits with code 1; Python callers can read the parts.
    """

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


class LayerConfigError(ValueError):
    """Raised inside a layer for a bad configuration or shape; the builder adds the location."""


@dataclass
class SourceMap:
    """Where each layer of a net definition starts, so build errors can name a line.

    ``layer_lines`` maps a layer name to the 1-based line of its ``layer {`` (or legacy
    ``layers {``) block; ``path`` is the file the net was read from, if any.
    """

    path: str | None = None
    layer_lines: dict[str, int] = field(default_factory=dict)

    def error(self, message: str, layer: str | None = None, layer_type: str | None = None):
        return CaffeAlexError(
            message,
            file=self.path,
            line=self.layer_lines.get(layer) if layer is not None else None,
            layer=layer,
            layer_type=layer_type,
        )
