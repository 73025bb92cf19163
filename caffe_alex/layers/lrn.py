"""LRN: local response normalisation across channels or within each channel.

Honours ``lrn_param``: ``local_size`` (odd), ``alpha``, ``beta``, ``k``, ``norm_region``
(``engine`` is accepted and ignored, as everywhere).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register

_LRN = caffe_pb2.LRNParameter


def channel_window_sum(t: torch.Tensor, half: int, weight: float = 1.0) -> torch.Tensor:
    """``weight`` times the sum over the channel window [c - half, c + half], clipped at the
    edges (zero padding).

    Adding shifted slices in place beat a padded cumsum, avg_pool3d and conv2d on AlexNet's
    norm1 (it is memory-bound and touches each element 2*half+1 times without any padding copy),
    and unlike a cumsum difference it cannot lose small windows to cancellation.
    """
    out = t * weight if weight != 1.0 else t.clone()
    channels = t.shape[1]
    for d in range(1, min(half, channels - 1) + 1):
        out[:, d:].add_(t[:, : channels - d], alpha=weight)
        out[:, : channels - d].add_(t[:, d:], alpha=weight)
    return out


def negative_power(scale: torch.Tensor, beta: float) -> torch.Tensor:
    """``scale ** -beta``. For AlexNet's, CaffeNet's and GoogLeNet's beta of 0.75 as
    1 / (sqrt(s) * sqrt(sqrt(s))): cheap passes instead of pow's transcendental one (norm1 at
    batch 32: 7 ms instead of 26), relative error under 6 * 2^-24 (pow's: 4 * 2^-24). Only
    correctly rounded ops (not rsqrt, which MKL computes differently by alignment), so the
    result is the same wherever the tensor lies."""
    if beta != 0.75:
        return scale.pow(-beta)
    root = scale.sqrt()
    return root.mul_(root.sqrt()).reciprocal_()


class CrossChannelLRN(torch.autograd.Function):
    """y = x * scale^-beta, scale = k + alpha/n * window_sum(x^2), with Caffe's closed-form
    backward: dx = dy * scale^-beta - (2 alpha beta / n) * x * window_sum(dy * y / scale).
    One fused Function instead of autograd through mul/pool/pow/div: several times faster."""

    @staticmethod
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float):
        half = (size - 1) // 2
        # Caffe scales each square by alpha/n before accumulating it onto k.
        scale = channel_window_sum(x * x, half, alpha / size).add_(k)
        scale_pow = negative_power(scale, beta)
        y = x * scale_pow
        ctx.save_for_backward(x, y, scale, scale_pow)
        ctx.half = half
        ctx.coeff = 2.0 * alpha * beta / size
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, scale, scale_pow = ctx.saved_tensors
        ratio = dy * y
        ratio.div_(scale)
        accum = channel_window_sum(ratio, ctx.half)
        dx = dy * scale_pow
        dx.addcmul_(x, accum, value=-ctx.coeff)
        return dx, None, None, None, None


def cross_channel_lrn(x, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    return CrossChannelLRN.apply(x, size, alpha, beta, k)


def within_channel_lrn(x, size: int, alpha: float, beta: float) -> torch.Tensor:
    """Caffe builds this from layers: square, AVE pooling (kernel n, stride 1, pad (n-1)/2),
    Power(shift 1, scale alpha, power -beta) and a product. With that pad every window of
    Caffe's AVE pooling counts n*n cells (padding included), so alpha is in effect alpha/n^2,
    and ``k`` plays no part."""
    pooled = F.avg_pool2d(x * x, size, stride=1, padding=(size - 1) // 2, count_include_pad=True)
    return x * (pooled * alpha + 1.0).pow(-beta)


@register("LRN")
class LRNLayer(CaffeLayer):
    """Local response normalisation (``lrn_param``); 4-D input (num, channels, height, width)."""

    params = {"lrn_param": frozenset({"local_size", "alpha", "beta", "k", "norm_region"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.lrn_param
        if p.local_size % 2 != 1:
            raise LayerConfigError(f"lrn_param.local_size must be odd, got {p.local_size}")
        if p.norm_region not in (_LRN.ACROSS_CHANNELS, _LRN.WITHIN_CHANNEL):
            raise LayerConfigError(f"lrn_param.norm_region {p.norm_region} is not supported")
        self.size = int(p.local_size)
        self.alpha, self.beta, self.k = float(p.alpha), float(p.beta), float(p.k)
        self.across = p.norm_region == _LRN.ACROSS_CHANNELS
        # The ACROSS_CHANNELS function; the ONNX exporter swaps in an opaque op of the same
        # formula while it traces, which it writes as ONNX's own LRN node.
        self.cross_channel = cross_channel_lrn

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise LayerConfigError(
                f"LRN input must have 4 axes (num, channels, height, width), got {list(shape)}"
            )
        return [shape]

    def forward(self, x):
        # Half precision (autocast) would lose the small alpha/n * sum next to k: work in float32.
        low = x.dtype in (torch.float16, torch.bfloat16)
        work = x.float() if low else x
        if self.across:
            y = self.cross_channel(work, self.size, self.alpha, self.beta, self.k)
        else:
            y = within_channel_lrn(work, self.size, self.alpha, self.beta)
        return y.to(x.dtype) if low else y

    def extra_repr(self) -> str:
        region = "ACROSS_CHANNELS" if self.across else "WITHIN_CHANNEL"
        return (
            f"{super().extra_repr()}, local_size={self.size}, alpha={self.alpha}, "
            f"beta={self.beta}, k={self.k}, norm_region={region}"
        )
