"""The "f(shift + scale*x)" family: Power (x^power), Exp (base^x) and Log (log_base x), with
Caffe's special cases and backward.

Honours ``power_param``, ``exp_param`` and ``log_param``: ``power``/``base``, ``scale``,
``shift``. Caffe computes their constants in float; so do we.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


def _f32(value: float) -> float:
    """A Python float rounded to float32, as Caffe keeps its constants."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


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


def _log_of_base(base: float, param: str) -> float:
    """Caffe's log(base) for Exp and Log: -1 stands for e (log exactly 1); any other base must be
    strictly positive with a finite log. Rounded once from double: glibc's logf agrees to 1 ulp."""
    if base == -1.0:
        return 1.0
    if not base > 0:  # NaN too: Caffe's CHECK_GT fails on it
        raise LayerConfigError(f"{param}.base must be strictly positive (or -1 for e), got {base}")
    log_base = _f32(math.log(base))
    if math.isinf(log_base):
        raise LayerConfigError(f"{param}.base {base} gives log(base) = {log_base}")
    return log_base


def _scale_shift(x, scale: float, shift: float):
    """shift + scale*x in Caffe's order (scale, then shift), skipping identity steps."""
    x = x * scale if scale != 1.0 else x
    return x + shift if shift != 0.0 else x


class _CaffeExp(torch.autograd.Function):
    """outer * exp(inner * x); backward (y * dy) * inner from the saved top, as Caffe."""

    @staticmethod
    def forward(ctx, x, inner: float, outer: float):
        y = torch.exp(x * inner if inner != 1.0 else x)
        if outer != 1.0:
            y = y.mul_(outer)
        ctx.save_for_backward(y)
        ctx.inner = inner
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        grad = y * dy
        return (grad.mul_(ctx.inner) if ctx.inner != 1.0 else grad), None, None


@register("Exp")
class ExpLayer(CaffeLayer):
    """y = base^(shift + scale*x) (``exp_param``; base -1 = e). Caffe folds the shift out of the
    exponent: y = outer * exp(inner * x) with inner = log(base)*scale and outer = base^shift,
    both float constants (outer exactly 1 when shift == 0)."""

    params = {"exp_param": frozenset({"base", "scale", "shift"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.exp_param
        self.base, self.scale, self.shift = float(p.base), float(p.scale), float(p.shift)
        log_base = _log_of_base(self.base, "exp_param")
        self.inner = _f32(log_base * self.scale)  # exact in double, then rounded: float product
        with np.errstate(over="ignore"):
            if self.shift == 0.0:
                self.outer = 1.0
            elif self.base == -1.0:
                self.outer = _f32(np.exp(self.shift))
            else:
                self.outer = _f32(np.power(self.base, self.shift))

    def forward(self, x):
        return _CaffeExp.apply(x, self.inner, self.outer)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base}, scale={self.scale}, shift={self.shift}"


class _CaffeLog(torch.autograd.Function):
    """log(shift + scale*x) * base_scale; backward dy * (num_scale / (shift + scale*x)) with
    num_scale = scale / log(base) rounded to float, as Caffe (x is saved, the base recomputed)."""

    @staticmethod
    def forward(ctx, x, scale: float, shift: float, base_scale: float, num_scale: float):
        y = torch.log(_scale_shift(x, scale, shift))
        if base_scale != 1.0:
            y = y.mul_(base_scale)
        ctx.save_for_backward(x)
        ctx.config = (scale, shift, num_scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        scale, shift, num_scale = ctx.config
        grad = torch.reciprocal(_scale_shift(x, scale, shift))
        if num_scale != 1.0:
            grad = grad.mul_(num_scale)
        return dy * grad, None, None, None, None


@register("Log")
class LogLayer(CaffeLayer):
    """y = log_base(shift + scale*x) (``log_param``; base -1 = e), computed as
    ln(shift + scale*x) * (1/log(base)) with float constants. Caffe refuses a base whose
    1/log(base) is infinite (base 1)."""

    params = {"log_param": frozenset({"base", "scale", "shift"})}
    output_needed_by_backward = False

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.log_param
        self.base, self.scale, self.shift = float(p.base), float(p.scale), float(p.shift)
        log_base = _log_of_base(self.base, "log_param")
        self.base_scale = _f32(1.0 / log_base) if log_base != 0.0 else math.inf
        if math.isinf(self.base_scale):
            raise LayerConfigError(
                f"log_param.base {self.base} gives 1/log(base) = {self.base_scale}"
            )
        self.num_scale = _f32(self.scale / log_base)

    def forward(self, x):
        return _CaffeLog.apply(x, self.scale, self.shift, self.base_scale, self.num_scale)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, base={self.base}, scale={self.scale}, shift={self.shift}"
