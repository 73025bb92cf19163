"""Shape inference over a built net (Caffe's Net::Reshape), each top held to Blob::Reshape's
limits."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import CaffeAlexError, LayerConfigError
from ..fillers import check_blob_shape
from ..registry import Shape
from .inputs import input_dims


def checked_tops(names: Sequence[str], shapes: Sequence[Sequence[int]]) -> list[Shape]:
    """The shape of each named top as ints, or LayerConfigError naming the top where Caffe's
    Blob::Reshape would refuse it (the caller adds the layer)."""
    return [
        check_blob_shape(s, f"top '{n}' (top {i})") for i, (n, s) in enumerate(zip(names, shapes))
    ]


def reshaped(net, input_shapes) -> dict[str, Shape]:
    """Every blob's shape of ``net`` (a Net) under new shapes of some of its inputs; an error
    names the layer whose tops they make impossible."""
    shapes = dict(net.blob_shapes)
    for name, shape in input_shapes.items():
        if name not in net.input_names:
            raise CaffeAlexError(f"'{name}' is not an input of the net; inputs: {net.input_names}")
        shapes[name] = input_dims(name, shape)
    for position, step in enumerate(net.steps):
        layer = net.layers[step.key]
        try:
            if layer.is_source:  # the given shapes, held to the limits at their layer
                checked_tops(step.tops, [shapes[t] for t in step.tops])
                continue
            tops = layer.top_shapes([shapes[b] for b in step.bottoms])
            tops = checked_tops(step.tops, [tuple(t) for t in tops])
        except LayerConfigError as exc:
            lp = net.net_param.layer[position]
            raise net._fail(lp, str(exc), position) from None
        for top, shape in zip(step.tops, tops):
            shapes[top] = shape
    return shapes
