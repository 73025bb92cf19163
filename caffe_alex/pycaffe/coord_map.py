"""pycaffe's ``caffe.coord_map``: how the spatial coordinates of one blob map to another's
through convolution, pooling, deconvolution and crop layers, and the ``crop`` helper that net
specs use to align a blob with a reference (FCN's score crops).

A map is ``(axis, a, b)``: a coordinate ``x`` of the layer's input is at ``a * x + b`` in its
output, for the axes after ``axis`` (``None``: any axis, for point-wise layers). ``a`` and
``b`` are NumPy arrays with one entry per spatial axis (or one for all).

Works on net spec tops (``caffe_alex.pycaffe.net_spec``), reading only what pycaffe's do:
``top.fn`` of a top, and ``type_name``, ``params`` (the layer's keyword arguments) and
``inputs`` (its bottom tops) of a function. Beyond pycaffe: pooling parameters may be nested
in ``pooling_param`` (pycaffe reads only ``convolution_param`` or the top level), top-level and
nested parameters are merged as net spec writes them into one message, and global pooling
raises UndefinedMapException (its output does not follow the input's coordinates).
"""

from __future__ import annotations

from collections import deque

import numpy as np

from . import net_spec

__all__ = [
    "PASS_THROUGH_LAYERS",
    "AxisMismatchException",
    "UndefinedMapException",
    "compose",
    "conv_params",
    "coord_map",
    "coord_map_from_to",
    "crop",
    "crop_params",
    "inverse",
]

# Point-wise layers (and Split, Eltwise): every output position is its input position.
PASS_THROUGH_LAYERS = [
    "AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log", "LRN", "Exp",
    "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split", "TanH", "Threshold",
]  # fmt: skip
_SPATIAL = ("Convolution", "Pooling", "Im2col")
_LEGACY_2D = {"pad_h", "pad_w", "kernel_h", "kernel_w", "stride_h", "stride_w"}


class UndefinedMapException(Exception):
    """The layer has no coordinate mapping (e.g. InnerProduct): walks stop at it."""


class AxisMismatchException(Exception):
    """Two maps to compose act on different axes."""


def _layer_params(fn, message: str) -> dict:
    """The layer's parameters as net spec writes them into one message: top-level keyword
    arguments overlaid by the nested ``<message>`` dict."""
    params = {k: v for k, v in fn.params.items() if not k.endswith("param")}
    params.update(fn.params.get(message) or {})
    return params


def conv_params(fn):
    """``(axis, stride, effective kernel size, pad)`` of a Convolution, Deconvolution, Im2col
    or Pooling function, the last three as 1-D arrays; the effective kernel size counts the
    dilation: ``(kernel_size - 1) * dilation + 1``."""
    nested = "pooling_param" if fn.type_name == "Pooling" else "convolution_param"
    params = _layer_params(fn, nested)
    legacy = _LEGACY_2D & set(params)
    if legacy:
        # raised, not asserted, so that it holds under python -O too
        raise AssertionError(
            f"coordinate maps need kernel_size/stride/pad, not the legacy {sorted(legacy)}"
        )
    if params.get("global_pooling"):
        raise UndefinedMapException(f"{fn.type_name} with global_pooling has no coordinate map")
    kernel = np.array(params["kernel_size"], ndmin=1)
    dilation = np.array(params.get("dilation", 1), ndmin=1)
    return (
        params.get("axis", 1),
        np.array(params.get("stride", 1), ndmin=1),
        (kernel - 1) * dilation + 1,
        np.array(params.get("pad", 0), ndmin=1),
    )


def crop_params(fn):
    """``(axis, offset)`` of a Crop function: axis 2 (the first spatial axis of N x C x H x W)
    and offset 0 unless given; offset as a 1-D array."""
    params = _layer_params(fn, "crop_param")
    return params.get("axis", 2), np.array(params.get("offset", 0), ndmin=1)


def coord_map(fn):
    """The map ``(axis, a, b)`` from the function's input coordinates to its output's."""
    kind = fn.type_name
    if kind in _SPATIAL:
        # output j is centred on input j * stride - pad + (kernel - 1) / 2
        axis, stride, kernel, pad = conv_params(fn)
        return axis, 1 / stride, (pad - (kernel - 1) / 2) / stride
    if kind == "Deconvolution":
        # the converse of a convolution with the same parameters
        axis, stride, kernel, pad = conv_params(fn)
        return axis, stride, (kernel - 1) / 2 - pad
    if kind in PASS_THROUGH_LAYERS:
        return None, 1, 0
    if kind == "Crop":
        # the map's axis is the last axis left alone; Crop's axis is the first it crops
        axis, offset = crop_params(fn)
        return axis - 1, 1, -offset
    raise UndefinedMapException(f"no coordinate map through a {kind} layer")


def compose(base_map, next_map):
    """``base_map`` after ``next_map``: x -> a1 * (a2 * x + b2) + b1. The axes must agree
    unless one of them is None (point-wise)."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"cannot compose maps over axes {ax1} and {ax2}")
    return (ax2 if ax1 is None else ax1), a1 * a2, a1 * b2 + b1


def inverse(coord_map):
    """The map back: x -> (x - b) / a."""
    ax, a, b = coord_map
    return ax, 1 / a, -b / a


def _mappable_bottoms(top):
    # Crop's second bottom only lends its size: coordinates flow from the first only
    bottoms = tuple(top.fn.inputs)
    return bottoms[:1] if top.fn.type_name == "Crop" else bottoms


def _maps_to(top):
    """Yield ``(blob, map from blob's coordinates to top's)`` for top and each blob it
    derives from through mappable layers, breadth first (nearest first)."""
    identity = (None, 1, 0)
    seen = {id(top)}  # by identity: tops are compared as objects, never by value
    queue = deque([(top, identity)])
    while queue:
        blob, blob_map = queue.popleft()
        yield blob, blob_map
        bottoms = _mappable_bottoms(blob)
        if not bottoms:
            continue
        try:
            layer_map = coord_map(blob.fn)
        except UndefinedMapException:
            continue
        step = compose(blob_map, layer_map)
        for bottom in bottoms:
            if id(bottom) not in seen:
                seen.add(id(bottom))
                queue.append((bottom, step))


def coord_map_from_to(top_from, top_to):
    """The map ``(axis, a, b)`` from ``top_from``'s coordinates to ``top_to``'s, through
    their nearest common ancestor; RuntimeError when no mappable path connects them. (All
    paths between two blobs are taken to map alike, as in pycaffe.)"""
    from_maps = {id(blob): blob_map for blob, blob_map in _maps_to(top_from)}
    for blob, to_map in _maps_to(top_to):
        if id(blob) in from_maps:
            return compose(to_map, inverse(from_maps[id(blob)]))
    raise RuntimeError(
        "cannot map coordinates between these tops: no chain of spatial or point-wise layers "
        "leads from both to a common blob"
    )


def crop(top_from, top_to):
    """A Crop layer (net spec top) cutting ``top_from`` to the region aligned with
    ``top_to``. AssertionError when no such crop exists: the blobs are at different scales,
    ``top_from`` does not cover ``top_to`` (negative offset), or the offset is fractional."""
    ax, a, b = coord_map_from_to(top_from, top_to)
    a, b = np.asarray(a), np.asarray(b)
    if not np.all(a == 1):
        raise AssertionError(f"cannot crop across a change of scale (a = {a})")
    if not np.all(b <= 0):
        raise AssertionError(f"cannot crop at a negative offset (b = {b})")
    if not np.all(np.round(b) == b):
        raise AssertionError(f"cannot crop at a fractional offset (b = {b})")
    # plain ints: the offsets go into a repeated uint32 field
    crop_param = {"offset": [int(v) for v in np.atleast_1d(-np.round(b))]}
    if ax is not None:  # None: only point-wise layers between, Crop's default axis will do
        crop_param = {"axis": ax + 1, **crop_param}
    return net_spec.layers.Crop(top_from, top_to, crop_param=crop_param)
