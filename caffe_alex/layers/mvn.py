"""MVN: mean (and variance) normalisation per channel, or per sample across channels.

Honours ``mvn_param``: ``normalize_variance`` (default true), ``across_channels`` (default
false), ``eps`` (default 1e-9).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


def legacy_shape(shape) -> tuple[int, int, int, int]:
    """Caffe's num/channels/height/width accessors: missing trailing axes read as 1, and a blob
    with more than 4 axes is refused."""
    if len(shape) > 4:
        raise LayerConfigError(
            f"needs a bottom with at most 4 axes (Caffe reads it as num, channels, height, "
            f"width), got shape {list(shape)}"
        )
    return tuple(shape) + (1,) * (4 - len(shape))


class _CaffeMVN(torch.autograd.Function):
    """Rows of a (num, dim) matrix normalised as Caffe does, with Caffe's backward.

    Forward: y = (x - E[x]) / (sqrt(E[(x - E[x])^2]) + eps): eps is added to the standard
    deviation, and the variance is the mean of the squared centred values (not E[x^2] - E[x]^2),
    each mean a sum times the float 1/dim. Backward (variance normalised):
    dx = (dy - (y * sum(y * dy) + sum(dy)) / dim) / (std + eps). This treats std + eps as if it
    were the std: it is autograd's exact gradient only when eps == 0, and it stays finite for a
    constant row (std 0), where autograd's sqrt would give inf/NaN.
    """

    @staticmethod
    def forward(ctx, x, normalize_variance: bool, eps: float):
        inv_dim = 1.0 / x.shape[1] if x.shape[1] else 0.0
        y = x - x.sum(dim=1, keepdim=True) * inv_dim
        ctx.normalize_variance, ctx.inv_dim = normalize_variance, inv_dim
        if not normalize_variance:
            return y
        var = (y * y).sum(dim=1, keepdim=True) * inv_dim
        std = var.sqrt() + eps
        y = y / std
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        if not ctx.normalize_variance:
            return dy - dy.sum(dim=1, keepdim=True) * ctx.inv_dim, None, None
        y, std = ctx.saved_tensors
        both = y * (y * dy).sum(dim=1, keepdim=True) + dy.sum(dim=1, keepdim=True)
        return (dy - both * ctx.inv_dim) / std, None, None


@register("MVN")
class MVNLayer(CaffeLayer):
    """Normalises each (sample, channel) over height x width, or each sample over channels x
    height x width with ``across_channels``. Caffe reshapes the top with the legacy 4-axis
    accessors, so a bottom with fewer axes gives a 4-axis top (an (N, C) bottom gives
    (N, C, 1, 1)). Half-precision inputs are normalised in float32 and returned in their dtype.
    """

    params = {"mvn_param": frozenset({"normalize_variance", "across_channels", "eps"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)  # already the float32 value Caffe adds

    def top_shapes(self, bottom_shapes):
        return [legacy_shape(bottom_shapes[0])]

    def forward(self, x):
        n, c, h, w = legacy_shape(x.shape)
        rows = (n, c * h * w) if self.across_channels else (n * c, h * w)
        dtype = x.dtype
        if x.is_floating_point() and x.element_size() < 4:
            x = x.float()  # the statistics of half-precision values would be too coarse
        y = _CaffeMVN.apply(x.reshape(rows), self.normalize_variance, self.eps)
        return y.reshape(n, c, h, w).to(dtype)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, normalize_variance={self.normalize_variance}, "
            f"across_channels={self.across_channels}, eps={self.eps:g}"
        )
