"""``caffe-alex convert`` and ``caffe-alex inspect``: weights files without writing Python."""

from __future__ import annotations

import os

import click

from ..formats import weights
from ..formats.caffemodel import read_binaryproto
from ..formats.weightset import shown
from ..net import Net
from .options import input_shape_option, option, parse_input_shapes, phase_option, user_errors


@click.command()
@click.argument("source")
@click.argument("destination")
@option("model", default=None, help="Net definition (needed where the target format needs it).")
@phase_option("TEST", "Phase of the net built from --model.")
@option("with-diffs", is_flag=True, help="Also write diffs (gradients; zeros in a fresh net).")
@input_shape_option()
@user_errors
def convert(source, destination, model, phase, with_diffs, input_shape) -> None:
    """Convert weights SOURCE to DESTINATION, formats by extension: .caffemodel,
    .caffemodel.h5, .pt, .safetensors; mean files .binaryproto <-> .npy."""
    net = None
    if model:  # the weights go through the net: shapes checked, its definitions written
        net = Net.from_prototxt(model, phase.upper(), input_shapes=parse_input_shapes(input_shape))
    click.echo(weights.convert(source, destination, net=net, with_diffs=with_diffs))


@click.command()
@click.argument("path")
@user_errors
def inspect(path) -> None:
    """List the layers, blob shapes, dtypes and parameter counts of a weights file
    (.caffemodel, .caffemodel.h5, .pt, .safetensors) or a .binaryproto mean file."""
    if path.lower().endswith(".binaryproto"):
        array = read_binaryproto(path)
        click.echo(f"{path}: BlobProto, shape {list(array.shape)}, {array.size} values")
        return
    ws = weights.read_weights(path)
    for line in inspect_lines(ws, os.path.getsize(path)):
        click.echo(line)


def inspect_lines(ws, size: int) -> list[str]:
    version = f", format version {ws.version}" if ws.format == "caffemodel" else ""
    name = f', net "{shown(ws.net_name)}"' if ws.net_name else ""
    lines = [f"{ws.path}: {ws.format}{version}{name}, {size:,} bytes"]
    rows = [("layer", "type", "blob", "shape", "dtype", "count")]
    total = blobs = 0
    for lw in ws.layers:
        layer, kind = shown(lw.name), shown(lw.type)  # bytes that are not UTF-8 as escapes
        if not lw.blobs:
            rows.append((layer, kind, "-", "", "", ""))
        for j, blob in enumerate(lw.blobs):
            if blob is None:
                rows.append((layer, kind, str(j), "(shared, not stored)", "", ""))
                continue
            shape = "x".join(map(str, blob.shape)) or "scalar"
            shape += " (legacy 4-D)" if blob.legacy else ""
            rows.append((layer, kind, str(j), shape, str(blob.data.dtype), f"{blob.data.size:,}"))
            total += blob.data.size
            blobs += 1
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append(f"total: {total:,} parameters in {blobs} blobs, {len(ws.layers)} layers")
    return lines
