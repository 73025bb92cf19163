"""Margin losses: HingeLoss (one-vs-all, on scores and labels) and ContrastiveLoss (on pairs of
features and a similarity label). Labels never get a gradient (Caffe refuses to compute one).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, count, register
from .labels import UNCHECKED, check_batch, check_labels, class_targets
from .log_losses import legacy_axes
from .losses import LossLayer, widened

_Norm = caffe_pb2.HingeLossParameter


@register("HingeLoss")
class HingeLossLayer(LossLayer):
    """sum_{n,k} max(0, 1 - s_nk * x_nk)^p / N with s_nk = +1 for the label's class and -1 for
    the others, p = 1 (``hinge_loss_param.norm`` L1, the default) or 2 (L2, with no 1/2).
    Each sample's classes are its count / N values; label n is value n of the label blob in
    memory order, truncated to an integer. Takes no loss_param field (Caffe reads none).
    Autograd's gradient is Caffe's: at the hinge (1 - s*x == 0) both give 0."""

    params = {"hinge_loss_param": frozenset({"norm"}), "loss_param": frozenset()}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.norm = layer_param.hinge_loss_param.norm

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        legacy_axes(bottom_shapes[0], "the score bottom")
        return [()]

    def forward(self, scores, label):
        num = scores.shape[0]
        x = widened(scores).reshape(num, count(scores.shape, 1))
        label = label.detach().reshape(-1)[:num]  # label n is value n, whatever its shape
        check_labels(self, label, x.shape[1], caffe_checks=UNCHECKED)
        target, inside = class_targets(label, x.shape[1])
        own = (torch.arange(x.shape[1], device=x.device) == target.unsqueeze(1)) & (
            inside.unsqueeze(1)
        )
        margin = torch.relu(1 + torch.where(own, -x, x))
        if self.norm == _Norm.L1:
            return margin.sum() / num
        return (margin * margin).sum() / num


class _CaffeContrastive(torch.autograd.Function):
    """ContrastiveLoss with Caffe's backward. With d = ||a - b|| per pair:
    similar (int(label) != 0): d^2; dissimilar: max(margin - d, 0)^2, or with legacy_version
    max(margin - d^2, 0); summed over pairs and divided by 2N. Backward for a dissimilar pair
    (b gets the negation): legacy -g/N * (a - b) where margin - d^2 > 0; otherwise
    -g/N * (margin - d) / (d + 1e-4) * (a - b) where margin - d > 0 (Caffe's 1e-4 keeps d == 0
    finite), else 0; a similar pair gives g/N * (a - b)."""

    @staticmethod
    def forward(ctx, a, b, similar, margin: float, legacy: bool):
        diff = a - b
        dist_sq = (diff * diff).sum(dim=1)
        if legacy:
            apart = torch.relu(margin - dist_sq)
        else:
            apart = torch.relu(margin - dist_sq.sqrt())
            apart = apart * apart
        ctx.save_for_backward(diff, dist_sq, similar)
        ctx.margin, ctx.legacy = margin, legacy
        return torch.where(similar, dist_sq, apart).sum() / a.shape[0] / 2

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        diff, dist_sq, similar = ctx.saved_tensors
        alpha = grad / diff.shape[0]
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = -alpha
        else:
            dist = dist_sq.sqrt()
            mdist = ctx.margin - dist
            beta = -alpha * mdist / (dist + 1e-4)
        coeff = torch.where(similar, alpha, torch.where(mdist > 0, beta, 0.0))
        grad_a = coeff.unsqueeze(1) * diff
        need_a, need_b = ctx.needs_input_grad[:2]
        return (grad_a if need_a else None), (-grad_a if need_b else None), None, None, None


@register("ContrastiveLoss")
class ContrastiveLossLayer(CaffeLayer):
    """Bottoms a, b (N x C, height and width 1) and the similarity label (N values, channels,
    height and width 1). ``contrastive_loss_param``: margin (default 1), legacy_version (default
    false). Takes no loss_param field (Caffe reads none)."""

    bottoms = (3, 3)
    is_loss = True
    params = {
        "contrastive_loss_param": frozenset({"margin", "legacy_version"}),
        "loss_param": frozenset(),
    }

    def allow_force_backward(self, bottom: int) -> bool:
        return bottom != 2  # Caffe's ContrastiveLoss: bottom 2 is the similarity label

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.contrastive_loss_param
        self.margin, self.legacy = float(p.margin), bool(p.legacy_version)

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        a, b, label = bottom_shapes
        for shape, what, first in ((a, "a", 2), (b, "b", 2), (label, "the label", 1)):
            legacy_axes(shape, f"bottom {what}")
            if count(shape, first) != 1:
                ones = "height and width" if first == 2 else "channels, height and width"
                raise LayerConfigError(f"bottom {what} must have {ones} 1, got {list(shape)}")
        if count(a, 1) != count(b, 1):
            raise LayerConfigError(f"a and b must have the same channels: {list(a)} vs {list(b)}")
        if count(label) < a[0]:  # Caffe would read past the label blob
            raise LayerConfigError(
                f"the label bottom holds {count(label)} values for {a[0]} pairs ({list(label)})"
            )
        return [()]

    def forward(self, a, b, label):
        num = a.shape[0]
        a = widened(a).reshape(num, -1)
        b = widened(b).reshape(num, -1).to(a.dtype)
        similar = label.detach().reshape(-1)[:num].long() != 0  # truncates, like static_cast<int>
        return _CaffeContrastive.apply(a, b, similar, self.margin, self.legacy)
