"""SSD's tensor layers (weiliu89/caffe, branch ``ssd``): Permute and Normalize.

Permute honours ``permute_param.order``: the listed axes first, then every axis not listed in
its own order (so ``order: 0 order: 2 order: 3 order: 1`` and ``order: 0 order: 2 order: 3``
both move channels last). Backward: autograd (the inverse permutation, as SSD's).

Normalize honours ``norm_param``: ``across_spatial``, ``channel_shared``, ``eps``,
``scale_filler`` (default constant 1). Each image (across_spatial) or each spatial position
(else) is divided by sqrt(sum of squares + eps) over C*H*W (resp. over C), eps inside the
root as SSD adds it, then multiplied by a learnt scale: one value (a blob with no axes, as
SSD's) when channel_shared, else one per channel. Backward: SSD's formulas, which are not the
true gradient with a scale per channel: SSD computes the bottom's diff as if the scale were
applied after the normalisation's gradient, s_j * (dy_j - x_j <x, dy> / norm^2) / norm, where
the gradient is (s_j dy_j - x_j <x, s dy> / norm^2) / norm. With channel_shared both agree. The
scale's diff is sum(top * dy) / scale, as SSD's (NaN where a scale is exactly 0).
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register
from .detection import legacy_dim


@register("Permute")
class PermuteLayer(CaffeLayer):
    """Reorders the axes as ``permute_param.order`` says (missing axes appended in order)."""

    params = {"permute_param": frozenset({"order"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        axes = len(bottom_shapes[0])
        order: list[int] = []
        for axis in layer_param.permute_param.order:
            if axis >= axes:
                raise LayerConfigError(
                    f"permute_param.order {axis} is out of range for the {axes}-D bottom "
                    f"{list(bottom_shapes[0])}"
                )
            if axis in order:
                raise LayerConfigError(f"permute_param.order lists axis {axis} twice")
            order.append(axis)
        self.order = tuple(order + [a for a in range(axes) if a not in order])

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != len(self.order):
            raise LayerConfigError(
                f"the bottom has {len(shape)} axes now, {len(self.order)} when the layer was set up"
            )
        return [tuple(shape[a] for a in self.order)]

    def forward(self, x):
        return x.permute(self.order).contiguous()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={list(self.order)}"


class _SSDNormalize(torch.autograd.Function):
    """Normalize on an N x C x S view, with SSD's Backward_cpu (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, scale, across: bool, shared: bool, eps: float):
        if across:
            norm = (x.square().sum(dim=(1, 2), keepdim=True) + eps).sqrt()
            y = x * norm.reciprocal()  # SSD scales by 1 / norm here, and divides below
        else:
            norm = (x.square().sum(dim=1, keepdim=True) + eps).sqrt()
            y = x / norm
        per_channel = scale if shared else scale.view(1, -1, 1)
        y = y * per_channel
        ctx.save_for_backward(x, y, scale, norm)
        ctx.across, ctx.shared = across, shared
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, scale, norm = ctx.saved_tensors
        dx = dscale = None
        if ctx.needs_input_grad[1]:
            if ctx.shared:
                dscale = (y * dy).sum() / scale
            else:
                dscale = (y * dy).sum(dim=(0, 2)) / scale
        if ctx.needs_input_grad[0]:
            if ctx.across:
                dot = (x * dy).sum(dim=(1, 2), keepdim=True)
                dx = (dy - x * (dot / norm / norm)) * norm.reciprocal()
            else:
                dot = (x * dy).sum(dim=1, keepdim=True)
                dx = (dy - x * dot / norm.square()) / norm
            dx = dx * (scale if ctx.shared else scale.view(1, -1, 1))
        return dx, dscale, None, None, None


@register("Normalize")
class NormalizeLayer(CaffeLayer):
    """L2 normalisation with a learnt scale (SSD's conv4_3_norm, ParseNet)."""

    params = {"norm_param": frozenset({"across_spatial", "channel_shared", "eps", "scale_filler"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.norm_param
        shape = self._checked(bottom_shapes[0])
        self.across_spatial, self.channel_shared = p.across_spatial, p.channel_shared
        self.eps = p.eps
        filler = p.scale_filler
        if not p.HasField("scale_filler"):
            filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        self.new_blob(() if self.channel_shared else (shape[1],), filler)

    @staticmethod
    def _checked(shape) -> tuple[int, ...]:
        shape = tuple(shape)
        if len(shape) < 2:
            raise LayerConfigError(
                f"Normalize needs a bottom with at least 2 axes, got {list(shape)}"
            )
        legacy_dim(shape, 0, "the bottom")
        return shape

    def top_shapes(self, bottom_shapes):
        shape = self._checked(bottom_shapes[0])
        if not self.channel_shared and shape[1] != self.blobs[0].numel():
            raise LayerConfigError(
                f"Normalize has {self.blobs[0].numel()} scales but the bottom has {shape[1]} "
                "channels"
            )
        return [shape]

    def forward(self, x):
        # half precision would lose the sum of squares: work in float32 there
        low = x.dtype in (torch.float16, torch.bfloat16)
        work = x.float() if low else x
        flat = work.reshape(work.shape[0], work.shape[1], -1)
        scale = self.blobs[0].to(work.dtype)
        y = _SSDNormalize.apply(flat, scale, self.across_spatial, self.channel_shared, self.eps)
        y = y.reshape(x.shape)
        return y.to(x.dtype) if low else y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, across_spatial={self.across_spatial}, "
            f"channel_shared={self.channel_shared}, eps={self.eps:g}"
        )
