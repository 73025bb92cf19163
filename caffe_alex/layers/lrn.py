"""LRN: local response normalisation across channels or within each channel.

Honours ``lrn_param``: ``local_size`` (odd), ``alpha``, ``beta``, ``k``, ``norm_region``
(``engine`` is accepted and ignored, as everywhere).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..log import get_logger
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register, tracing

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
    def forward(ctx, x, size: int, alpha: float, beta: float, k: float, fused: bool = False):
        half = (size - 1) // 2
        ctx.half, ctx.coeff = half, 2.0 * alpha * beta / size
        out = FUSED.forward(x, half, alpha / size, k, beta) if fused else None
        ctx.fused = out is not None  # the backward as the forward ran
        if out is None:
            # Caffe scales each square by alpha/n before accumulating it onto k.
            scale = channel_window_sum(x * x, half, alpha / size).add_(k)
            scale_pow = negative_power(scale, beta)
            out = x * scale_pow, scale, scale_pow
        y, scale, scale_pow = out
        ctx.save_for_backward(x, y, scale, scale_pow)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, scale, scale_pow = ctx.saved_tensors
        dx = FUSED.backward(dy, x, y, scale, scale_pow, ctx.half, ctx.coeff) if ctx.fused else None
        if dx is None:
            ratio = dy * y
            ratio.div_(scale)
            accum = channel_window_sum(ratio, ctx.half)
            dx = dy * scale_pow
            dx.addcmul_(x, accum, value=-ctx.coeff)
        return dx, None, None, None, None, None


# -- the fused CPU kernels of training -------------------------------------------------------
# LRN is memory-bound: the eager forward passes over the tensor about eleven times (square,
# window sum, k, two roots, product, ...), the backward about nine. torch.compile (inductor)
# fuses each into one loop over the channel window: AlexNet's norm1 at batch 32, forward +
# backward, 55-70 -> 20 ms; at batch 256, 320 -> 112 ms. It compiles once per shape (about 12 s
# the first time on a machine, 1-4 s from inductor's on-disk cache), so it is used only where
# a gradient is recorded (training, which runs long) on tensors of at least FUSED_FROM
# elements; inference and small tensors keep the eager ops. Same formulas, the same order of
# operations (squares scaled, then summed; the roots for beta 0.75): relative error against
# float64 as the eager path's (tests/layers/test_lrn.py). CAFFE_ALEX_FUSED_LRN=0 turns it off;
# a failed compile (no C++ compiler, say) warns once and leaves the eager ops in place.
FUSED_FROM = 1 << 20  # AlexNet's norm1 holds 290,400 elements per image


def _window_sum_for_inductor(t: torch.Tensor, half: int) -> torch.Tensor:
    """The channel window sum as shifted slices of one zero-padded tensor, which inductor
    fuses into the loop that uses it (eager, ``channel_window_sum`` is the cheaper form)."""
    channels = t.shape[1]
    padded = F.pad(t, (0, 0, 0, 0, half, half))
    total = padded[:, half : half + channels]
    for d in range(1, half + 1):
        total = total + padded[:, half - d : half - d + channels]
        total = total + padded[:, half + d : half + d + channels]
    return total


def _fused_forward(x, half: int, alpha_over_n: float, k: float, beta: float):
    scale = _window_sum_for_inductor(x * x * alpha_over_n, half) + k
    scale_pow = negative_power(scale, beta)  # (inductor turns its in-place steps into one loop)
    return x * scale_pow, scale, scale_pow


def _fused_backward(dy, x, y, scale, scale_pow, half: int, coeff: float):
    accum = _window_sum_for_inductor(dy * y / scale, half)
    return dy * scale_pow - coeff * x * accum


class _FusedKernels:
    """The compiled forward and backward, made on first use; ``forward`` and ``backward``
    return None where they cannot run (then the caller computes eagerly)."""

    MAX_VARIANTS = 8  # shapes x constants; dynamo's own cache per function holds 8 by default

    def __init__(self):
        self.enabled = os.environ.get("CAFFE_ALEX_FUSED_LRN", "1") != "0"
        self._forward = self._backward = None
        self._seen: set = set()

    def pays(self, x: torch.Tensor) -> bool:
        return (self.enabled and x.device.type == "cpu" and x.dtype == torch.float32
                and x.numel() >= FUSED_FROM and not tracing())  # fmt: skip

    def forward(self, x, half, alpha_over_n, k, beta):
        key = (tuple(x.shape), half, alpha_over_n, k, beta)
        if key not in self._seen:
            if len(self._seen) >= self.MAX_VARIANTS:
                return None
            get_logger().info(
                "LRN: compiling a fused CPU kernel for %s (once per shape; "
                "CAFFE_ALEX_FUSED_LRN=0 keeps the eager ops)", list(x.shape))  # fmt: skip
            self._seen.add(key)
        if self._forward is None:
            self._forward = torch.compile(_fused_forward, dynamic=False, fullgraph=True)
        return self._run(self._forward, x, half, alpha_over_n, k, beta)

    def backward(self, dy, x, y, scale, scale_pow, half, coeff):
        if not self.enabled:  # a failed forward compile: eager from here on
            return None
        if self._backward is None:
            self._backward = torch.compile(_fused_backward, dynamic=False, fullgraph=True)
        return self._run(self._backward, dy.contiguous(), x, y, scale, scale_pow, half, coeff)

    def _run(self, compiled, *args):
        try:
            return compiled(*args)
        except Exception as exc:  # inductor needs a working C++ compiler; none is a slow path
            self.enabled = False
            get_logger().warning("LRN: the fused kernel failed to compile (%s: %s); using the "
                                 "eager ops", type(exc).__name__, str(exc).splitlines()[0]
                                 if str(exc) else "")  # fmt: skip
            return None


FUSED = _FusedKernels()


def cross_channel_lrn(x, size: int, alpha: float, beta: float, k: float) -> torch.Tensor:
    # (whether a gradient is recorded is known here, not inside the Function's forward)
    fused = torch.is_grad_enabled() and x.requires_grad and FUSED.pays(x)
    return CrossChannelLRN.apply(x, size, alpha, beta, k, fused)


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
