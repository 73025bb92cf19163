"""LSTMUnit: one time step of Caffe's LSTM non-linearity (the cell of the LSTM layer).

Bottoms c_prev (1 x N x D), the gate pre-activations (1 x N x 4D, blocks i, f, o, g) and the
continuation markers cont (1 x N); tops c and h (1 x N x D). No parameters.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


def _activations(x, cont):
    """Caffe's gates; the forget gate is multiplied by cont, and is exactly 0 where cont is 0."""
    i, f, o, g = x.chunk(4, dim=-1)
    cont = cont.unsqueeze(-1)
    f = torch.where(cont == 0, torch.zeros_like(f), cont * torch.sigmoid(f))
    return torch.sigmoid(i), f, torch.sigmoid(o), torch.tanh(g)


class _LSTMUnit(torch.autograd.Function):
    """c = f*c_prev + i*g, h = o*tanh(c), with the backward of Caffe's CPU code (the reference
    implementation): the forget gate's derivative is taken as f*(1 - f) with f already scaled
    by cont, which is the true derivative only for cont in {0, 1}. (Caffe's GPU kernel uses
    cont*s*(1 - s) instead, s = sigmoid; the two agree for binary markers.) cont gets no
    gradient: Caffe refuses to backpropagate to it."""

    @staticmethod
    def forward(ctx, c_prev, x, cont):
        i, f, o, g = _activations(x, cont)
        c = f * c_prev + i * g
        h = o * torch.tanh(c)
        ctx.save_for_backward(c_prev, x, cont, c)
        return c, h

    @staticmethod
    @once_differentiable
    def backward(ctx, dc, dh):
        c_prev, x, cont, c = ctx.saved_tensors
        i, f, o, g = _activations(x, cont)
        tanh_c = torch.tanh(c)
        c_term = dc + dh * o * (1 - tanh_c * tanh_c)
        dx = torch.cat(
            (
                c_term * g * i * (1 - i),
                c_term * c_prev * f * (1 - f),
                dh * tanh_c * o * (1 - o),
                c_term * i * (1 - g * g),
            ),
            dim=-1,
        )
        return c_term * f, dx, None


def lstm_unit(c_prev, x, cont):
    """One LSTM step as Caffe's LSTMUnit computes it; returns (c, h)."""
    return _LSTMUnit.apply(c_prev, x, cont.detach().to(x.dtype))


@register("LSTMUnit")
class LSTMUnitLayer(CaffeLayer):
    """Caffe's LSTMUnit: i, f, o = sigmoid, g = tanh of the four D-wide blocks of bottom 1;
    c = cont * f * c_prev + i * g; h = o * tanh(c)."""

    bottoms = (3, 3)
    tops = (2, 2)

    def top_shapes(self, bottom_shapes):
        c_prev, x, cont = (tuple(s) for s in bottom_shapes)
        if len(c_prev) != 3 or c_prev[0] != 1:
            raise LayerConfigError(
                f"bottom 0 (c_prev) must be 1 x N x D (3 axes), got shape {list(c_prev)}"
            )
        for index, what, shape, form in (
            (1, "gate input", x, "1 x N x 4D"),
            (2, "cont", cont, "1 x N"),
        ):
            if len(shape) != len(form.split(" x ")) or shape[0] != 1 or shape[1] != c_prev[1]:
                raise LayerConfigError(
                    f"bottom {index} ({what}) must be {form} with N = {c_prev[1]} "
                    f"(from c_prev), got shape {list(shape)}"
                )
        if x[2] != 4 * c_prev[2]:
            raise LayerConfigError(
                f"bottom 1 (gate input) must have 4 * {c_prev[2]} = {4 * c_prev[2]} values per "
                f"stream (4 x the cell size of bottom 0), got shape {list(x)}"
            )
        return [c_prev, c_prev]

    def forward(self, c_prev, x, cont):
        return lstm_unit(c_prev, x, cont)
