"""Piecewise constant or linear element-wise layers: Clip and Threshold.

Honours ``clip_param`` (``min``, ``max``) and ``threshold_param.threshold``.
"""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, compiling, register


class _CaffeClip(torch.autograd.Function):
    """Caffe's CPU clip, max(min, min(x, max)) with std::min/std::max: NaN becomes ``min`` and
    min > max gives ``min`` everywhere (torch.clamp would keep NaN and give ``max``). The
    gradient passes wherever min <= x <= max, bounds included."""

    @staticmethod
    def forward(ctx, x, low: float, high: float):
        capped = torch.where(x > high, high, x)
        ctx.save_for_backward(x)
        ctx.bounds = (low, high)
        return torch.where(capped > low, capped, low)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        low, high = ctx.bounds
        return dy * ((x >= low) & (x <= high)).to(dy.dtype), None, None


@register("Clip")
class ClipLayer(CaffeLayer):
    """Clips to [``clip_param.min``, ``clip_param.max``]. Both fields are required once
    clip_param is given (Caffe's parser refuses the net otherwise); a Clip layer without
    clip_param at all reads the proto defaults, 0 and 0, so its output is 0, as in Caffe."""

    params = {"clip_param": frozenset({"min", "max"})}
    output_needed_by_backward = False

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.clip_param
        if layer_param.HasField("clip_param"):
            for field in ("min", "max"):
                if not p.HasField(field):
                    raise LayerConfigError(f"clip_param.{field} is required when clip_param is set")
        self.min, self.max = float(p.min), float(p.max)

    def forward(self, x):
        return _CaffeClip.apply(x, self.min, self.max)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min={self.min}, max={self.max}"


class _CaffeThreshold(torch.autograd.Function):
    """(x > threshold) as 0/1 in the input's dtype (NaN gives 0). Caffe has no backward for it
    (NOT_IMPLEMENTED) and aborts whenever the net must run it: a bottom needs a gradient and
    the top reaches a loss. Autograd reaches this backward in exactly those cases, so it raises
    instead of letting a zero gradient through silently."""

    @staticmethod
    def forward(ctx, x, threshold: float, name: str):
        ctx.name = name
        return (x > threshold).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        raise CaffeAlexError(
            "Caffe has no backward for Threshold (NOT_IMPLEMENTED) and aborts when asked for "
            "one; stop the gradient below this layer (propagate_down: false on its bottom)",
            layer=ctx.name,
            layer_type="Threshold",
        )


@register("Threshold")
class ThresholdLayer(CaffeLayer):
    """y = 1 where x > ``threshold_param.threshold`` (default 0, strictly greater), else 0."""

    params = {"threshold_param": frozenset({"threshold"})}
    output_needed_by_backward = False

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.threshold = float(layer_param.threshold_param.threshold)

    def forward(self, x):
        if compiling():
            # a compiled graph cannot raise from its backward: there the gradient stops here,
            # as with propagate_down: false (eager mode raises, as Caffe aborts)
            return (x > self.threshold).to(x.dtype)
        return _CaffeThreshold.apply(x, self.threshold, self.name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"
