"""Softmax and ArgMax.

Softmax honours ``softmax_param``: ``axis``; ArgMax ``argmax_param``: ``out_max_val``,
``top_k``, ``axis``.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, count, register


@register("Softmax")
class SoftmaxLayer(CaffeLayer):
    """Softmax over ``axis`` (default 1), computed with the maximum subtracted as Caffe does."""

    params = {"softmax_param": frozenset({"axis"})}
    pure = True  # (a train net's "prob" output runs only where it is read: Net.loss_only)

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.axis = layer_param.softmax_param.axis
        canonical_axis(self.axis, len(bottom_shapes[0]))

    def top_shapes(self, bottom_shapes):
        canonical_axis(self.axis, len(bottom_shapes[0]))
        return [tuple(bottom_shapes[0])]

    def forward(self, x):
        return torch.softmax(x, dim=canonical_axis(self.axis, x.dim()))


@register("ArgMax")
class ArgMaxLayer(CaffeLayer):
    """The ``top_k`` largest entries' indices (as floats), optionally with their values.

    Without ``axis`` each sample is searched over all its values and the top is
    (N, 1, top_k, 1, ...) with at least 3 axes, or (N, 2, top_k, ...) with ``out_max_val``
    (indices, then values). With ``axis`` the top has ``top_k`` along that axis and holds the
    values instead of the indices when ``out_max_val`` is set. Caffe sorts (value, index) pairs
    in descending order, so among equal values the larger index ranks first. No backward.
    """

    params = {"argmax_param": None}
    pure = True

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.argmax_param
        self.top_k = int(param.top_k)
        self.out_max_val = param.out_max_val
        self.axis = param.axis if param.HasField("axis") else None
        if self.top_k < 1:
            raise LayerConfigError(f"argmax_param.top_k must be at least 1, got {self.top_k}")

    def _searched(self, shape) -> tuple[int | None, int]:
        """(canonical axis or None, number of candidates) after checking top_k fits."""
        if self.axis is None:
            axis, size = None, count(shape, 1)
        else:
            axis = canonical_axis(self.axis, len(shape))
            size = shape[axis]
        if self.top_k > size:
            raise LayerConfigError(
                f"argmax_param.top_k {self.top_k} exceeds the {size} values searched "
                f"(bottom shape {list(shape)})"
            )
        return axis, size

    def top_shapes(self, bottom_shapes):
        shape = list(bottom_shapes[0])
        axis, _ = self._searched(shape)
        if axis is not None:
            shape[axis] = self.top_k
            return [tuple(shape)]
        top = [1] * max(len(shape), 3)
        top[0], top[1], top[2] = shape[0], 2 if self.out_max_val else 1, self.top_k
        return [tuple(top)]

    def forward(self, x):
        axis, size = self._searched(x.shape)
        x = x.detach()
        scores = x.reshape(x.shape[0], -1) if axis is None else x
        dim = 1 if axis is None else axis
        # A stable descending sort of the reversed values ranks ties by larger index first.
        values, order = torch.sort(scores.flip(dim), dim=dim, descending=True, stable=True)
        values = values.narrow(dim, 0, self.top_k)
        dtype = torch.promote_types(x.dtype, torch.float32)  # indices must stay exact
        index = (size - 1 - order.narrow(dim, 0, self.top_k)).to(dtype)
        if axis is not None:
            return values.to(dtype) if self.out_max_val else index
        parts = [index, values.to(dtype)] if self.out_max_val else [index]
        return torch.stack(parts, dim=1).reshape(self.top_shapes([x.shape])[0])
