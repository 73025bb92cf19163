"""Layers of the mobile and classification forks: ShuffleChannel (farmingyard/ShuffleNet),
ConvolutionDepthwise (farmingyard/caffe-mobilenet), DepthwiseConvolution
(yonghenglh6/DepthwiseConvolution), ReLU6 (chuanqi305/ssd) and Axpy (hujie-frank/SENet).

Each follows its fork's C++ (forward, shape checks, backward); docs/forks.md lists the fields
honoured and where a fork's behaviour was undefined and what happens here instead.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, canonical_axis, register
from .conv import ConvolutionLayer


@register("ShuffleChannel")
class ShuffleChannelLayer(CaffeLayer):
    """Channels viewed as [group, C / group] and transposed: top channel j * group + i is
    bottom channel i * (C / group) + j. The fork's backward applies the inverse permutation,
    which is autograd's gradient of this gather.

    The fork's Reshape builds the top from the legacy num/channels/height/width accessors, so
    a bottom of 2 or 3 axes gets a 4-D top with the missing axes 1, and more than 4 axes fail.
    """

    params = {"shuffle_channel_param": frozenset({"group"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.group = layer_param.shuffle_channel_param.group
        if self.group <= 0:
            raise LayerConfigError(
                f"shuffle_channel_param.group must be greater than 0, got {self.group}"
            )

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if not 2 <= len(shape) <= 4:
            raise LayerConfigError(
                f"needs a bottom of 2 to 4 axes (N, C, ...), got shape {list(shape)}"
            )
        channels = shape[1]
        if channels % self.group:
            raise LayerConfigError(
                f"shuffle_channel_param.group {self.group} does not divide the bottom's "
                f"{channels} channels"
            )
        return [(*shape, *(1,) * (4 - len(shape)))]

    def forward(self, x):
        n, c = x.shape[:2]
        top = x.reshape(n, self.group, c // self.group, -1).transpose(1, 2)
        return top.reshape(n, c, *x.shape[2:], *(1,) * (4 - x.dim()))


@register("DepthwiseConvolution")
class DepthwiseConvolutionLayer(ConvolutionLayer):
    """yonghenglh6/DepthwiseConvolution: a BaseConvolutionLayer whose CPU path is Convolution's
    (num_output and group are read and checked as Convolution reads them; MobileNets set both
    to the channel count). Its CUDA kernel assumes group = channels = num_output and no
    dilation; this is the CPU (true convolution) result for every setting."""

    type_names = ("DepthwiseConvolution",)


@register("ConvolutionDepthwise")
class ConvolutionDepthwiseLayer(ConvolutionLayer):
    """farmingyard/caffe-mobilenet: one kh x kw filter per channel of a 4-D bottom; weight
    [C, 1, kh, kw], bias [C]. The fork ignores num_output and group (the top always has the
    bottom's channels) and reads kernel/stride/pad/dilation for the two spatial axes. Its
    output size is computed in unsigned arithmetic, so a kernel wider than the padded input
    is an error here rather than a wrapped-around size. Where the fork reads stride or pad
    that the prototxt does not give (undefined behaviour there), Convolution's defaults
    (stride 1, pad 0) apply."""

    type_names = ("ConvolutionDepthwise",)
    bottoms = (1, 1)
    tops = (1, 1)

    def __init__(self, layer_param, bottom_shapes, phase):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise LayerConfigError(f"needs a 4-D (N, C, H, W) bottom, got shape {list(shape)}")
        cp = layer_param.convolution_param
        if canonical_axis(cp.axis, 4, "convolution_param.axis") != 1:
            raise LayerConfigError(
                f"convolution_param.axis {cp.axis}: ConvolutionDepthwise always convolves "
                "axis 1 (the fork ignores axis)"
            )
        # One filter per channel whatever num_output and group say: hand Convolution's
        # parser a copy where they say so.
        depthwise = caffe_pb2.LayerParameter()
        depthwise.CopyFrom(layer_param)
        depthwise.convolution_param.num_output = shape[1]
        depthwise.convolution_param.group = shape[1]
        super().__init__(depthwise, bottom_shapes, phase)

    def _out_size(self, i: int, size: int) -> int:
        span = size + 2 * self.pad[i] - self._extent(i)
        if span < 0:
            raise LayerConfigError(
                f"kernel extent {self._extent(i)} is larger than the padded input "
                f"({size} + 2 * {self.pad[i]}) on spatial axis {i}"
            )
        return span // self.stride[i] + 1


class _ReLU6(torch.autograd.Function):
    """chuanqi305/ssd's ReLU6: forward min(max(x, 0), 6) (NaN stays NaN); backward passes the
    gradient only where 0 < x < 6, so 0 at exactly 0 and 6 and at NaN. The test is made on
    the output, which is equivalent and lets the layer work in place."""

    @staticmethod
    def forward(ctx, x, overwrite: bool):
        if overwrite:
            ctx.mark_dirty(x)
            y = x.clamp_(0, 6)
        else:
            y = x.clamp(0, 6)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        return dy * ((y > 0) & (y < 6)), None


@register("ReLU6")
class ReLU6Layer(CaffeLayer):
    """min(max(x, 0), 6) with the fork's strict-interval gradient; relu6_param has only the
    engine choice."""

    params = {"relu6_param": frozenset()}
    can_overwrite_bottom = True

    def forward(self, x):
        overwrite = self.in_place and not (x.is_leaf and x.requires_grad)
        return _ReLU6.apply(x, overwrite)


@register("Axpy")
class AxpyLayer(CaffeLayer):
    """hujie-frank/SENet: top = a * x + y with a = bottom 0 (N x C, or N x C x 1 x 1: one scale
    per sample and channel), x = bottom 1 and y = bottom 2 (same shape, N x C x ...). The
    fork's backward is the true gradient (a: sum over space of dtop * x; x: a * dtop; y: dtop).
    The fork checks only the first two axes of a, and its 1 x 1 tail when a is 4-D; a scale
    blob with other trailing sizes (which the fork would misread) is refused here."""

    bottoms = (3, 3)

    def top_shapes(self, bottom_shapes):
        a, x, y = (tuple(s) for s in bottom_shapes)
        if len(a) < 2 or len(x) < 2:
            raise LayerConfigError(
                f"needs a scale (bottom 0) and data (bottom 1) of at least 2 axes, got shapes "
                f"{list(a)} and {list(x)}"
            )
        if a[:2] != x[:2]:
            raise LayerConfigError(
                f"scale (bottom 0) shape {list(a)} does not match x (bottom 1) shape "
                f"{list(x)} on the first two axes (N, C)"
            )
        if any(d != 1 for d in a[2:]):
            raise LayerConfigError(
                f"scale (bottom 0) must hold one value per sample and channel (N x C or "
                f"N x C x 1 x 1), got shape {list(a)}"
            )
        if x != y:
            raise LayerConfigError(
                f"x (bottom 1) shape {list(x)} and y (bottom 2) shape {list(y)} differ"
            )
        return [x]

    def forward(self, a, x, y):
        scale = a.reshape(*x.shape[:2], *(1,) * (x.dim() - 2))
        return torch.addcmul(y, scale, x)
