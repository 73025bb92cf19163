"""Power: y = (shift + scale * x) ^ power, with Caffe's special cases and backward.

Honours ``power_param``: ``power``, ``scale``, ``shift``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..registry import CaffeLayer, register


class _CaffePowerGrad(torch.autograd.Function):
    """(shift + scale*x)^power for power != 1 and power*scale != 0, with the derivative written
    as Caffe writes it, which differs from autograd's where shift + scale*x == 0:
      power == 2: 2*scale*(shift + scale*x), computed as ds*scale*x + ds*shift (ds = power*scale);
      shift == 0: power * y / x (NaN at x == 0, where autograd would give 0 or inf);
      otherwise:  ds * y / (shift + scale*x)."""

    @staticmethod
    def forward(ctx, x, power: float, scale: float, shift: float, diff_scale: float):
        base = x * scale if scale != 1.0 else x
        base = base + shift if shift != 0.0 else base
        y = base.pow(power)
        ctx.save_for_backward(x, y)
        ctx.config = (power, scale, shift, diff_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        power, scale, shift, diff_scale = ctx.config
        if power == 2.0:
            grad = x * (diff_scale * scale)
            if shift != 0.0:
                grad.add_(diff_scale * shift)
        elif shift == 0.0:
            grad = (y / x).mul_(power)
        else:
            base = x * scale if scale != 1.0 else x.clone()
            grad = y / base.add_(shift)
            if diff_scale != 1.0:
                grad.mul_(diff_scale)
        return dy * grad, None, None, None, None


class _Constant(torch.autograd.Function):
    """power == 0 or scale == 0: Caffe ignores the input and its gradient is exactly 0."""

    @staticmethod
    def forward(ctx, x, value: float):
        return torch.full_like(x, value)

    @staticmethod
    def backward(ctx, dy):
        return torch.zeros_like(dy), None


@register("Power")
class PowerLayer(CaffeLayer):
    """y = (shift + scale*x)^power (``power_param``), evaluated in Caffe's order: scale, then
    shift, then pow, each step skipped when it is the identity."""

    params = {"power_param": frozenset({"power", "scale", "shift"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)
        self.diff_scale = float(np.float32(self.power) * np.float32(self.scale))  # float product
        self.constant = self.diff_scale == 0.0
        # Caffe's constant is 1 when power == 0, else shift^power in float (inf for 0^-1).
        with np.errstate(all="ignore"):
            value = np.power(np.float32(self.shift), np.float32(self.power))
        self.value = 1.0 if self.power == 0 else float(value)

    def forward(self, x):
        if self.constant:
            return _Constant.apply(x, self.value)
        if self.power == 1.0:  # affine: autograd's dy*scale is Caffe's
            y = x * self.scale if self.scale != 1.0 else x
            return y + self.shift if self.shift != 0.0 else y
        return _CaffePowerGrad.apply(x, self.power, self.scale, self.shift, self.diff_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, power={self.power}, scale={self.scale}, shift={self.shift}"
