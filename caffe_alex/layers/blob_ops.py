"""Layers that join, cut or copy whole blobs: Concat, Slice, Split, Silence.

Concat honours ``concat_param``: ``axis``, ``concat_dim``; Slice ``slice_param``: ``axis``,
``slice_dim``, ``slice_point``.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, register


def reject_in_place(layer_param) -> None:
    """Caffe's CHECK_NE(top, bottom) for layers that share or alias their bottom's memory."""
    if layer_param.bottom and layer_param.bottom[0] in layer_param.top:
        raise LayerConfigError(
            f"does not allow in-place computation (top '{layer_param.bottom[0]}' is its bottom)"
        )


class _AxisByRank:
    """A layer's axis per bottom rank, worked out once per rank: read in forward, where the
    proto's HasField would stop torch.compile's tracing (a graph break per call)."""

    def __init__(self, param, legacy: str, ndim: int):
        self.param, self.legacy = param, legacy
        self.axes = {ndim: _legacy_axis(param, legacy, ndim)}

    def __call__(self, ndim: int) -> int:
        axis = self.axes.get(ndim)
        if axis is None:
            axis = self.axes[ndim] = _legacy_axis(self.param, self.legacy, ndim)
        return axis


def _legacy_axis(param, legacy: str, ndim: int) -> int:
    """``axis`` (may be negative) or the legacy unsigned ``concat_dim`` / ``slice_dim``."""
    if param.HasField("axis") and param.HasField(legacy):
        raise LayerConfigError(f"give either axis or {legacy}, not both")
    if param.HasField(legacy):
        return canonical_axis(getattr(param, legacy), ndim, legacy)
    return canonical_axis(param.axis, ndim)


@register("Concat")
class ConcatLayer(CaffeLayer):
    """Joins the bottoms along ``axis`` (default 1); every other dim must agree."""

    bottoms = (1, None)
    params = {"concat_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.param = layer_param.concat_param
        self.axis = _AxisByRank(self.param, "concat_dim", len(bottom_shapes[0]))

    def top_shapes(self, bottom_shapes):
        first = list(bottom_shapes[0])
        axis = _legacy_axis(self.param, "concat_dim", len(first))
        top = list(first)
        for index, shape in enumerate(bottom_shapes[1:], start=1):
            other = list(shape)
            if len(other) != len(first) or any(
                a != b for j, (a, b) in enumerate(zip(first, other, strict=True)) if j != axis
            ):
                raise LayerConfigError(
                    f"bottoms must have the same shape except at axis {axis}: bottom 0 is "
                    f"{first}, bottom {index} is {other}"
                )
            top[axis] += other[axis]
        return [tuple(top)]

    def forward(self, *bottoms):
        if len(bottoms) == 1:
            return bottoms[0]
        return torch.cat(bottoms, dim=self.axis(bottoms[0].dim()))


@register("Slice")
class SliceLayer(CaffeLayer):
    """Cuts the bottom along ``axis`` at ``slice_point`` (N-1 points for N tops), or equally."""

    tops = (1, None)
    params = {"slice_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.param = layer_param.slice_param
        self.points = list(self.param.slice_point)
        self.n_top = len(layer_param.top)
        if self.points and len(self.points) != self.n_top - 1:
            raise LayerConfigError(
                f"{len(self.points)} slice_point values for {self.n_top} tops; give N-1 for N tops"
            )
        self.axis = _AxisByRank(self.param, "slice_dim", len(bottom_shapes[0]))

    def top_shapes(self, bottom_shapes):
        shape = list(bottom_shapes[0])
        axis = _legacy_axis(self.param, "slice_dim", len(shape))
        sizes = self._sizes(shape[axis], axis, shape)
        return [tuple(shape[:axis] + [s] + shape[axis + 1 :]) for s in sizes]

    def _sizes(self, total: int, axis: int, shape) -> list[int]:
        if not self.points:
            if total % self.n_top:
                raise LayerConfigError(
                    f"{self.n_top} tops do not evenly divide axis {axis} of size {total} "
                    f"(bottom shape {shape})"
                )
            return [total // self.n_top] * self.n_top
        bounds = [0, *self.points, total]
        if (
            any(b <= a for a, b in zip(bounds[:-2], bounds[1:-1], strict=True))
            or bounds[-2] > total
        ):
            raise LayerConfigError(
                f"slice_point {self.points} must be strictly increasing, positive and within "
                f"axis {axis} of size {total} (bottom shape {shape})"
            )
        return [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    def forward(self, x):
        axis = self.axis(x.dim())
        return tuple(torch.split(x, self._sizes(x.shape[axis], axis, x.shape), dim=axis))


@register("Split")
class SplitLayer(CaffeLayer):
    """Copies its bottom to every top; autograd sums the tops' gradients as Caffe does."""

    tops = (1, None)

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        reject_in_place(layer_param)
        self.n_top = len(layer_param.top)

    def top_shapes(self, bottom_shapes):
        return [tuple(bottom_shapes[0])] * self.n_top

    def forward(self, x):
        return (x,) * self.n_top


@register("Silence")
class SilenceLayer(CaffeLayer):
    """Consumes its bottoms so they are not net outputs; produces nothing."""

    bottoms = (1, None)
    tops = (0, 0)

    def top_shapes(self, bottom_shapes):
        return []

    def forward(self, *bottoms):
        return ()
