"""Im2col (convolution_param) and SPP (spp_param): windows of an image, unrolled or pooled.

Im2col: the columns a Caffe convolution multiplies, as a layer. Honoured fields: kernel_size,
stride, pad, dilation (once, or once per spatial axis), kernel_h/kernel_w, stride_h/stride_w,
pad_h/pad_w (2-D only), axis, force_nd_im2col (another code path, the same numbers). No blobs.
Top (*lead, C * prod(kernel), *out) with channels ordered (c, k_0, k_1, ...), and Convolution's
output size, its C++ truncating division included (a window up to stride - 1 wider than the
padded input still gives one output, reading zeros). Caffe does not check dilation > 0:
dilation 0 repeats one pixel over the kernel, here too.

SPP: spatial pyramid pooling. Level l (0 .. pyramid_height - 1) is a Caffe Pooling (pool MAX or
AVE) with 2^l x 2^l bins: kernel = ceil(H / bins), pad = (kernel * bins - H + 1) / 2, stride =
kernel (same for W); each level is flattened to (N, C * bins_h * bins_w) and the levels
concatenated in order. pyramid_height 1 is one global pooling, not flattened: (N, C, 1, 1).
As in Caffe's Reshape, the levels are recomputed from each new bottom size, with Pooling's
checks (pad < kernel fails for small inputs: a 5-pixel side at 4 bins needs kernel 2, pad 2).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, canonical_axis, register
from .conv import window_params
from .pooling import PoolingLayer


class _Im2colND(torch.autograd.Function):
    """im2col by strided slices of the zero-padded input, any number of spatial axes and any
    dilation (0 included). Backward adds the columns back kernel offset by kernel offset, the
    order of Caffe's col2im (CPU)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad, dilation, out):
        pads = []
        for d, k, s, p, dil, o in zip(x.shape[2:], kernel, stride, pad, dilation, out):
            need = (o - 1) * s + (k - 1) * dil + 1
            pads = [p, max(p, need - d - p), *pads]  # F.pad lists the last axis first
        padded = F.pad(x, pads)
        windows = _Im2colND.windows(kernel, stride, dilation, out)
        cols = x.new_empty((*x.shape[:2], len(windows), *out))
        for index, window in enumerate(windows):
            cols[:, :, index] = padded[(slice(None), slice(None), *window)]
        ctx.config = (x.shape, padded.shape, pad, windows)
        return cols.flatten(1, 2)

    @staticmethod
    def windows(kernel, stride, dilation, out):
        return [
            tuple(
                slice(i * dil, i * dil + (o - 1) * s + 1, s)
                for i, s, dil, o in zip(offsets, stride, dilation, out)
            )
            for offsets in itertools.product(*(range(k) for k in kernel))
        ]

    @staticmethod
    def backward(ctx, dy):
        shape, padded_shape, pad, windows = ctx.config
        cols = dy.reshape(*shape[:2], len(windows), *dy.shape[2:])
        grad = dy.new_zeros(padded_shape)
        for index, window in enumerate(windows):
            grad[(slice(None), slice(None), *window)] += cols[:, :, index]
        inside = tuple(slice(p, p + d) for p, d in zip(pad, shape[2:]))
        return grad[(slice(None), slice(None), *inside)], None, None, None, None, None


@register("Im2col")
class Im2colLayer(CaffeLayer):
    """The convolution columns of the bottom: (N, C, H, W) -> (N, C * kh * kw, H_out, W_out)."""

    # Caffe's Im2col reads only the geometry (kernel, stride, pad, dilation, axis); the other
    # fields of a Convolution's param (num_output, group, fillers, ...) change nothing, so a
    # net that carries them over builds, as in Caffe.
    params = {"convolution_param": None}
    output_needed_by_backward = False

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        cp = layer_param.convolution_param
        shape = bottom_shapes[0]
        self.axis = canonical_axis(cp.axis, len(shape), "convolution_param.axis")
        self.ndim, n = len(shape), len(shape) - self.axis - 1
        if n < 1:
            raise LayerConfigError(
                f"needs a spatial axis after the channel axis {self.axis}; bottom shape "
                f"{list(shape)} has none"
            )
        self.kernel, self.stride, self.pad, self.dilation = window_params(cp, n)
        for what, values in (("kernel", self.kernel), ("stride", self.stride)):
            if min(values) <= 0:
                raise LayerConfigError(f"{what} sizes must be positive, got {list(values)}")
        self.top_shapes(bottom_shapes)

    def _span(self, i: int, size: int) -> int:
        """Padded size minus the dilated kernel: negative when the kernel sticks out."""
        return size + 2 * self.pad[i] - (self.dilation[i] * (self.kernel[i] - 1) + 1)

    def _out(self, spatial) -> list[int]:
        # C++ int division truncates toward zero: a span in (-stride, 0) still gives 1
        return [int(self._span(i, d) / self.stride[i]) + 1 for i, d in enumerate(spatial)]

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != self.ndim:
            raise LayerConfigError(
                f"bottom shape {list(shape)} has {len(shape)} axes; the layer was set up for "
                f"{self.ndim}"
            )
        out = self._out(shape[self.axis + 1 :])
        if min(out) < 0:
            raise LayerConfigError(
                f"output spatial size {out} is negative for bottom shape {list(shape)}"
            )
        return [(*shape[: self.axis], shape[self.axis] * math.prod(self.kernel), *out)]

    def forward(self, x):
        lead = x.shape[: self.axis]
        batch = x.reshape(-1, *x.shape[self.axis :])
        out = self._out(x.shape[self.axis + 1 :])
        channels = x.shape[self.axis] * math.prod(self.kernel)
        if min(out) == 0:  # Caffe allows an empty top
            return x.reshape(-1)[:0].reshape(*lead, channels, *out)
        if len(out) == 2 and min(self.dilation) > 0:
            cols = self._unfold(batch)
        else:
            args = (self.kernel, self.stride, self.pad, self.dilation, tuple(out))
            cols = _Im2colND.apply(batch, *args)
        return cols.reshape(*lead, channels, *out)

    def _unfold(self, x):
        # Same column order as Caffe, and the same col2im accumulation order in backward.
        # A kernel sticking out past the padding: widen the far side so unfold keeps the one
        # window Caffe's truncating division gives.
        short = [max(0, -self._span(i, d)) for i, d in enumerate(x.shape[2:])]
        if any(short):
            x = F.pad(x, [0, short[1], 0, short[0]])
        return F.unfold(x, self.kernel, self.dilation, self.pad, self.stride)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel={self.kernel}, stride={self.stride}, "
            f"pad={self.pad}, dilation={self.dilation}"
        )


class _Split(torch.autograd.Function):
    """One bottom read by n layers, as Caffe's Split: the gradients are summed level 0 first."""

    @staticmethod
    def forward(ctx, x, n: int):
        return tuple(x.view_as(x) for _ in range(n))

    @staticmethod
    def backward(ctx, *grads):
        total = grads[0]
        for grad in grads[1:]:
            total = total + grad
        return total, None


def spp_pooling_param(level: int, height: int, width: int, pool: int) -> caffe_pb2.LayerParameter:
    """Caffe's SPPLayer::GetPoolingParam: the Pooling covering the image with 2^level bins."""
    bins = 2**level
    kernel = [-(-size // bins) for size in (height, width)]
    pad = [(k * bins - size + 1) // 2 for k, size in zip(kernel, (height, width))]
    pp = caffe_pb2.PoolingParameter(
        pool=pool, kernel_h=kernel[0], kernel_w=kernel[1], stride_h=kernel[0],
        stride_w=kernel[1], pad_h=pad[0], pad_w=pad[1],
    )  # fmt: skip
    return caffe_pb2.LayerParameter(type="Pooling", top=["pooled"], pooling_param=pp)


@register("SPP")
class SPPLayer(CaffeLayer):
    """Spatial pyramid pooling of an (N, C, H, W) bottom into (N, C * sum of bins) features."""

    params = {"spp_param": frozenset({"pyramid_height", "pool"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        sp = layer_param.spp_param
        self.pyramid_height = sp.pyramid_height
        if self.pyramid_height <= 0:
            raise LayerConfigError("spp_param.pyramid_height must be positive (it is required)")
        self.method = caffe_pb2.SPPParameter.PoolMethod.Name(sp.pool)
        if self.method not in ("MAX", "AVE"):
            raise LayerConfigError(f"spp_param.pool {self.method} is not supported (MAX or AVE)")
        self.pool = caffe_pb2.PoolingParameter.PoolMethod.Value(self.method)
        self._levels: dict[tuple[int, int], list[PoolingLayer]] = {}
        self.top_shapes(bottom_shapes)

    def _pools(self, height: int, width: int) -> list[PoolingLayer]:
        """The Pooling of each level for this bottom size (Caffe rebuilds them on Reshape)."""
        key = (height, width)
        if key not in self._levels:
            pools = []
            for level in range(self.pyramid_height):
                lp = spp_pooling_param(level, height, width, self.pool)
                lp.name = f"{self.name} level {level}"
                try:
                    pool = PoolingLayer(lp, [], self.phase)
                    pool.top_shapes([(1, 1, height, width)])
                except LayerConfigError as exc:
                    bins = 2**level
                    raise LayerConfigError(
                        f"pyramid level {level} ({bins}x{bins} bins) of a {height}x{width} "
                        f"bottom: {exc}"
                    ) from None
                pools.append(pool)
            if len(self._levels) >= 64:  # inputs of ever new sizes: keep the cache small
                self._levels.clear()
            self._levels[key] = pools
        return self._levels[key]

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise LayerConfigError(f"needs a 4-D (N, C, H, W) bottom, got shape {list(shape)}")
        if min(shape[2:]) <= 0:
            raise LayerConfigError(f"input height and width must be positive, got {list(shape)}")
        tops = [pool.top_shapes([shape])[0] for pool in self._pools(*shape[2:])]
        if self.pyramid_height == 1:
            return tops
        return [(shape[0], sum(math.prod(top[1:]) for top in tops))]

    def forward(self, x):
        pools = self._pools(x.shape[2], x.shape[3])
        if len(pools) == 1:
            return pools[0](x)
        copies = _Split.apply(x, len(pools))
        return torch.cat([pool(c).flatten(1) for pool, c in zip(pools, copies)], 1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pyramid_height={self.pyramid_height}, pool={self.method}"
