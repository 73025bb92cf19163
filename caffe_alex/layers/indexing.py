"""Filter and BatchReindex: items of a batch picked by another bottom.

Filter: bottoms = the blobs to filter, then a selector of shape (N,) or (N, 1, ...); the tops
are the items of each blob whose selector value is nonzero (NaN counts as nonzero, as in
Caffe's ``if (value)``). How many are kept is known only when the data arrives: the builder
declares each top with its bottom's shape, as Caffe's first Reshape does, so
``Net.blob_shapes`` holds an **upper bound** for Filter tops (and the layers after them) while
the tensors carry the real count. When nothing is selected the tops have 0 items, as Caffe's
Reshape gives them.

BatchReindex: bottoms data and 1-D indices (floats, truncated to integers as Caffe's
``static_cast<int>``); top = data[indices] along axis 0. Caffe CHECKs each index is in
[0, N) before forward; repeated indices add up in backward.

Both refuse backward to the selector / indices (Caffe fails there): with a gradient wanted for
that bottom, ``backward`` raises CaffeAlexError; ``propagate_down: false`` avoids it.
"""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, register, tracing


class GatherRows(torch.autograd.Function):
    """``table[rows]`` along axis 0, shaped ``rows.shape + table.shape[1:]``. ``guarded`` is the
    bottom the rows came from: it gets no gradient, and asking for one raises ``refusal``
    (message, layer name, layer type). Backward adds each top row into its source row in top
    order, as Caffe's CPU loops do (repeated rows accumulate; rows never picked get 0)."""

    @staticmethod
    def forward(ctx, table, guarded, rows, refusal):
        ctx.save_for_backward(rows)
        ctx.table_shape, ctx.refusal = table.shape, refusal
        flat = rows.reshape(-1)
        return table.index_select(0, flat).reshape(*rows.shape, *table.shape[1:])

    @staticmethod
    def backward(ctx, dy):
        if ctx.needs_input_grad[1]:
            message, layer, layer_type = ctx.refusal
            raise CaffeAlexError(message, layer=layer, layer_type=layer_type)
        (rows,) = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = dy.new_zeros(ctx.table_shape)
            grad.index_add_(0, rows.reshape(-1), dy.reshape(-1, *ctx.table_shape[1:]))
        return grad, None, None, None


def first_bad(bad: torch.Tensor, values: torch.Tensor) -> tuple[int, float] | None:
    """Position and value of the first flagged element, or None (one host sync)."""
    if not bool(bad.any()):
        return None
    position = int(torch.nonzero(bad.reshape(-1))[0, 0])
    return position, float(values.reshape(-1)[position])


@register("Filter")
class FilterLayer(CaffeLayer):
    """Tops = the bottoms' items whose selector (the last bottom) is nonzero."""

    bottoms = (2, None)
    tops = (1, None)

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        if len(layer_param.top) != len(bottom_shapes) - 1:
            raise LayerConfigError(
                f"needs one top per filtered bottom: {len(bottom_shapes) - 1} bottoms to filter "
                f"(the last bottom is the selector), {len(layer_param.top)} tops"
            )
        self.refusal = (
            "cannot backpropagate to the selector (the last bottom); set its propagate_down "
            "to false",
            self.name,
            self.type_name,
        )

    def top_shapes(self, bottom_shapes):
        selector = tuple(bottom_shapes[-1])
        if not selector or any(d != 1 for d in selector[1:]):
            raise LayerConfigError(
                f"the selector (last bottom) must have shape (N,) or (N, 1, ...), "
                f"got {list(selector)}"
            )
        for index, shape in enumerate(bottom_shapes[:-1]):
            if not shape or shape[0] != selector[0]:
                raise LayerConfigError(
                    f"bottom {index} has shape {list(shape)}: its first dimension must be the "
                    f"selector's ({selector[0]})"
                )
        # Caffe's first Reshape keeps every item: the upper bound of what forward keeps.
        return [tuple(shape) for shape in bottom_shapes[:-1]]

    def forward(self, *bottoms):
        selector = bottoms[-1]
        rows = torch.nonzero(selector.reshape(-1)).reshape(-1)
        return tuple(GatherRows.apply(b, selector, rows, self.refusal) for b in bottoms[:-1])


@register("BatchReindex")
class BatchReindexLayer(CaffeLayer):
    """top = data[indices] along axis 0; top shape (len(indices), *data.shape[1:])."""

    bottoms = (2, 2)

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.refusal = (
            "cannot backpropagate to the indices (bottom 1); set its propagate_down to false",
            self.name,
            self.type_name,
        )

    def top_shapes(self, bottom_shapes):
        data, indices = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        if len(indices) != 1:
            raise LayerConfigError(f"the indices (bottom 1) must be 1-D, got shape {list(indices)}")
        if not data:
            raise LayerConfigError("the data (bottom 0) needs at least one axis")
        return [(indices[0], *data[1:])]

    def forward(self, data, indices):
        n = data.shape[0]
        if not tracing():
            bad = first_bad(~((indices >= 0) & (indices < n)), indices)
            if bad is not None:
                raise CaffeAlexError(
                    f"index {bad[1]:g} (position {bad[0]}) is out of range for a batch of "
                    f"{n}: must be in [0, {n})",
                    layer=self.name,
                    layer_type=self.type_name,
                )
        return GatherRows.apply(data, indices, indices.long(), self.refusal)
