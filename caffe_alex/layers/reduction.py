"""Reduction: SUM, ASUM, SUMSQ or MEAN over every axis from ``axis`` to the end, times coeff.

Honours ``reduction_param``: ``operation`` (default SUM), ``axis`` (default 0), ``coeff``
(default 1).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from ..proto import caffe_pb2
from ..registry import CaffeLayer, canonical_axis, count, register

_Op = caffe_pb2.ReductionParameter


class _CaffeAbsSum(torch.autograd.Function):
    """coeff * sum|x| per row, with Caffe's backward sign(x) * (dy * coeff), where
    sign(x) = (0 < x) - (x < 0): 0 at 0 (as autograd) and also 0 for NaN (autograd: NaN)."""

    @staticmethod
    def forward(ctx, rows, coeff: float):
        ctx.save_for_backward(rows)
        ctx.coeff = coeff
        total = rows.abs().sum(dim=1)
        return total * coeff if coeff != 1.0 else total

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (rows,) = ctx.saved_tensors
        sign = (rows > 0).to(rows.dtype) - (rows < 0).to(rows.dtype)
        scaled = dy * ctx.coeff if ctx.coeff != 1.0 else dy
        return sign * scaled.unsqueeze(1), None


@register("Reduction")
class ReductionLayer(CaffeLayer):
    """The top keeps the bottom's axes before ``axis`` (axis 0: a 0-axis scalar). MEAN is SUM
    with coeff / (reduced count), that quotient taken in the blob's float type as Caffe does.
    The other backward rules (SUM, MEAN: dy * coeff; SUMSQ: 2 * dy * coeff * x) are autograd's
    with the same rounding."""

    params = {"reduction_param": frozenset({"operation", "axis", "coeff"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.reduction_param
        self.operation, self.axis, self.coeff = p.operation, p.axis, float(p.coeff)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        return [shape[: canonical_axis(self.axis, len(shape), "reduction_param.axis")]]

    def _coeff(self, dim: int, dtype: torch.dtype) -> float:
        if self.operation != _Op.MEAN:
            return self.coeff
        if dtype == torch.float64:
            return self.coeff / dim if dim else float("inf")
        with np.errstate(divide="ignore"):  # an empty reduction: Caffe's coeff / 0 is inf
            return float(np.float32(self.coeff) / np.float32(dim))

    def forward(self, x):
        axis = canonical_axis(self.axis, x.dim(), "reduction_param.axis")
        top, dim = x.shape[:axis], count(x.shape, axis)
        rows = x.reshape(count(top), dim)
        coeff = self._coeff(dim, x.dtype)
        if self.operation == _Op.ASUM:
            return _CaffeAbsSum.apply(rows, coeff).reshape(top)
        total = (rows * rows if self.operation == _Op.SUMSQ else rows).sum(dim=1)
        return (total * coeff if coeff != 1.0 else total).reshape(top)

    def extra_repr(self) -> str:
        op = _Op.ReductionOp.Name(self.operation)
        return f"{super().extra_repr()}, operation={op}, axis={self.axis}, coeff={self.coeff:g}"
