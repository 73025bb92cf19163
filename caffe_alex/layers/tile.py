"""Tile (tile_param): the bottom repeated ``tiles`` times along ``axis``.

Honoured fields: axis (default 1; negative counts from the end), tiles (required, > 0). In
Caffe's memory order each slice of the axes before ``axis`` is copied ``tiles`` times in a row,
so the tiled axis reads x_0 .. x_{d-1}, x_0 .. x_{d-1}, ... (what ``Tensor.repeat`` gives).
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, register


class _Tile(torch.autograd.Function):
    """Forward: ``repeat`` along the axis. Backward: Caffe sums the copies one after another
    from the first (CPU and GPU alike); a reduction over the tile axis may add them in another
    order and round differently."""

    @staticmethod
    def forward(ctx, x, axis: int, tiles: int):
        ctx.axis, ctx.tiles = axis, tiles
        reps = [1] * x.dim()
        reps[axis] = tiles
        return x.repeat(reps)

    @staticmethod
    def backward(ctx, dy):
        axis, tiles = ctx.axis, ctx.tiles
        shape = dy.shape
        copies = dy.reshape(*shape[:axis], tiles, shape[axis] // tiles, *shape[axis + 1 :])
        grad = copies.select(axis, 0)
        for t in range(1, tiles):
            grad = grad + copies.select(axis, t)
        return grad.contiguous(), None, None


@register("Tile")
class TileLayer(CaffeLayer):
    """top.shape[axis] = bottom.shape[axis] * tiles; backward sums the copies."""

    params = {"tile_param": frozenset({"axis", "tiles"})}
    output_needed_by_backward = False

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        tp = layer_param.tile_param
        if not tp.HasField("tiles"):
            raise LayerConfigError("tile_param.tiles is required")
        if tp.tiles <= 0:
            raise LayerConfigError(f"tile_param.tiles must be positive, got {tp.tiles}")
        self.axis_param, self.tiles = tp.axis, tp.tiles
        self.top_shapes(bottom_shapes)

    def _axis(self, ndim: int) -> int:
        return canonical_axis(self.axis_param, ndim, "tile_param.axis")

    def top_shapes(self, bottom_shapes):
        shape = list(bottom_shapes[0])
        axis = self._axis(len(shape))
        shape[axis] *= self.tiles
        return [tuple(shape)]

    def forward(self, x):
        return _Tile.apply(x, self._axis(x.dim()), self.tiles)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, axis={self.axis_param}, tiles={self.tiles}"
