"""Convolution and Deconvolution (convolution_param), as BaseConvolutionLayer defines them.

Honoured fields: num_output, bias_term, pad, kernel_size, stride, dilation (one value for every
spatial axis, or one per axis), pad_h/pad_w, kernel_h/kernel_w, stride_h/stride_w (2-D only),
group, axis, weight_filler, bias_filler, force_nd_im2col (an im2col detail: no effect here).
Axes before the channel axis are flattened into the batch, as Caffe does; 1 to 3 spatial axes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, register, tracing

_FIELDS = frozenset(
    "num_output bias_term pad kernel_size stride dilation pad_h pad_w kernel_h kernel_w stride_h "
    "stride_w group axis weight_filler bias_filler force_nd_im2col".split()
)
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_DECONV = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def window_params(cp, n: int) -> tuple[tuple[int, ...], ...]:
    """kernel, stride, pad and dilation of ``convolution_param`` for ``n`` spatial axes."""
    return (per_axis(cp, "kernel_size", n, None), per_axis(cp, "stride", n, 1),
            per_axis(cp, "pad", n, 0), per_axis(cp, "dilation", n, 1, hw=False))  # fmt: skip


def per_axis(cp, name: str, n: int, default: int | None, hw: bool = True) -> tuple[int, ...]:
    """``name`` given once, once per spatial axis, or (2-D only) as ``name_h``/``name_w``."""
    if hw:
        short = name.replace("_size", "")
        if cp.HasField(f"{short}_h") or cp.HasField(f"{short}_w"):
            if n != 2:
                raise LayerConfigError(
                    f"{short}_h/{short}_w can only be used for 2-D convolution "
                    f"({n} spatial axes here)"
                )
            if len(getattr(cp, name)):
                raise LayerConfigError(f"give either {name} or {short}_h/{short}_w, not both")
            return getattr(cp, f"{short}_h"), getattr(cp, f"{short}_w")
    values = list(getattr(cp, name))
    if not values and default is not None:
        return (default,) * n
    if len(values) not in (1, n):
        raise LayerConfigError(
            f"{name} must be given once or once per spatial axis "
            f"({len(values)} given for {n} spatial axes)"
        )
    return tuple(values) * n if len(values) == 1 else tuple(values)


class _BaseConvolution(CaffeLayer):
    bottoms = (1, None)
    tops = (1, None)
    params = {"convolution_param": _FIELDS}
    transposed = False
    output_needed_by_backward = False  # a following ReLU may work in place

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        cp = layer_param.convolution_param
        shape = bottom_shapes[0]
        self.axis = canonical_axis(cp.axis, len(shape), "convolution_param.axis")
        self.ndim, n = len(shape), len(shape) - self.axis - 1
        if n not in _CONV:
            raise LayerConfigError(
                f"needs 1 to 3 spatial axes after the channel axis "
                f"{self.axis}; bottom shape {list(shape)} has {n}"
            )
        self.kernel, self.stride, self.pad, self.dilation = window_params(cp, n)
        for what, values in (
            ("kernel", self.kernel),
            ("stride", self.stride),
            ("dilation", self.dilation),
        ):
            if min(values) <= 0:
                raise LayerConfigError(f"{what} sizes must be positive, got {list(values)}")
        self.channels, self.num_output, self.group = shape[self.axis], cp.num_output, cp.group
        if self.num_output <= 0:
            raise LayerConfigError("convolution_param.num_output must be positive")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise LayerConfigError(
                f"input channels ({self.channels}) and num_output "
                f"({self.num_output}) must be multiples of group ({self.group})"
            )
        out_c, in_c = self.num_output, self.channels
        if self.transposed:  # Caffe keeps the weight in the forward convolution's layout
            out_c, in_c = in_c, out_c
        self.new_blob((out_c, in_c // self.group, *self.kernel), cp.weight_filler)
        self.bias_term = cp.bias_term
        if self.bias_term:
            self.new_blob((self.num_output,), cp.bias_filler)
        self.n_top = len(layer_param.top)

    def _extent(self, i: int) -> int:
        return self.dilation[i] * (self.kernel[i] - 1) + 1

    def top_shapes(self, bottom_shapes):
        if len(bottom_shapes) != self.n_top:
            raise LayerConfigError(
                f"needs one top per bottom ({len(bottom_shapes)} bottoms, {self.n_top} tops)"
            )
        shape = tuple(bottom_shapes[0])
        for i, other in enumerate(bottom_shapes[1:], 1):
            if tuple(other) != shape:
                raise LayerConfigError(
                    f"bottom {i} has shape {list(other)}, but bottom 0 has "
                    f"{list(shape)}; all bottoms must have the same shape"
                )
        if len(shape) != self.ndim or shape[self.axis] != self.channels:
            raise LayerConfigError(
                f"bottom shape {list(shape)} does not fit the weights (set up "
                f"for {self.ndim} axes, {self.channels} channels)"
            )
        spatial = [self._out_size(i, d) for i, d in enumerate(shape[self.axis + 1 :])]
        if min(spatial) <= 0:
            raise LayerConfigError(
                f"output spatial size {spatial} is empty for bottom shape {list(shape)}"
            )
        return [(*shape[: self.axis], self.num_output, *spatial)] * len(bottom_shapes)

    def forward(self, *bottoms):
        tops = tuple(self._forward_one(x) for x in bottoms)
        return tops[0] if len(tops) == 1 else tops

    def _forward_one(self, x):
        lead = x.shape[: self.axis]
        if self.axis != 1:  # Caffe treats every axis before the channel axis as the batch
            x = x.reshape(-1, *x.shape[self.axis :])
        weight = self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        y = self._op(x, weight, bias)
        return y if self.axis == 1 else y.reshape(*lead, *y.shape[1:])


@register("Convolution")
class ConvolutionLayer(_BaseConvolution):
    """Cross-correlation; output size floor((in + 2 pad - dilated_kernel) / stride) + 1."""

    def _out_size(self, i: int, size: int) -> int:
        # C++ division truncates: a kernel up to stride - 1 wider than the padded input still
        # gives one output, its window reading zeros past the end (im2col's bounds check).
        return int((size + 2 * self.pad[i] - self._extent(i)) / self.stride[i]) + 1

    def _op(self, x, weight, bias):
        short = [max(0, self._extent(i) - d - 2 * self.pad[i]) for i, d in enumerate(x.shape[2:])]
        if any(short):
            x = F.pad(x, [v for extra in reversed(short) for v in (0, extra)])
        if _single_channel_pays_in_nhwc(x, weight, self.group):
            y = F.conv2d(_nhwc_view(x), _nhwc_view(weight), bias, self.stride, self.pad,
                         self.dilation)  # fmt: skip
            return y.contiguous()  # the net's NCHW order again for the layers after it
        return _CONV[len(self.kernel)](
            x, weight, bias, self.stride, self.pad, self.dilation, self.group
        )


# oneDNN (torch 2.13, measured on AVX2) computes the weight gradient of a convolution with one
# input channel, NCHW, below a batch of 128 with a slow direct kernel: the Fashion-MNIST
# AlexNet's conv1 at batch 32 took 155 ms forward + backward, 55 ms with the same tensors seen
# as NHWC (which, with one channel, is the same memory). From 128 on it picks a faster NCHW
# algorithm (164 against 300 ms at 128), and a forward alone is faster in NCHW (15 against
# 22 ms), so the NHWC view is taken only when a gradient is recorded and the batch is small.
_NHWC_BELOW_BATCH = 128


def _single_channel_pays_in_nhwc(x: torch.Tensor, weight: torch.Tensor, group: int) -> bool:
    return (
        x.dim() == 4
        and x.shape[1] == 1
        and group == 1
        and x.shape[0] < _NHWC_BELOW_BATCH
        and x.device.type == "cpu"
        and torch.is_grad_enabled()
        and (weight.requires_grad or x.requires_grad)
        and x.is_contiguous()
        and weight.is_contiguous()
        and not tracing()
    )


def _nhwc_view(t: torch.Tensor) -> torch.Tensor:
    """A contiguous NCHW tensor of one channel seen with NHWC strides (no copy)."""
    n, _, h, w = t.shape
    return t.reshape(n, h, w, 1).permute(0, 3, 1, 2)


@register("Deconvolution")
class DeconvolutionLayer(_BaseConvolution):
    """Convolution's backward pass as a layer; output size stride (in - 1) + dilated_kernel -
    2 pad. The weight blob is (input channels, num_output / group, *kernel)."""

    transposed = True

    def _out_size(self, i: int, size: int) -> int:
        return self.stride[i] * (size - 1) + self._extent(i) - 2 * self.pad[i]

    def _op(self, x, weight, bias):
        return _DECONV[len(self.kernel)](
            x, weight, bias, self.stride, self.pad, 0, self.group, self.dilation
        )
