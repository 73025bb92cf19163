"""Log losses on class labels: MultinomialLogisticLoss (on probabilities) and InfogainLoss (on
scores, through an internal softmax, weighted by an information-gain matrix H).

Both clamp probabilities at Caffe's kLOG_THRESHOLD (1e-20 as a float) before the log, while
their gradients are Caffe's: 1/max(p, 1e-20) for MultinomialLogisticLoss and the unclamped
softmax form p * sum(H[label]) - H[label] for InfogainLoss. Labels are truncated to integers
and never get a gradient (nor does an H given as a bottom: Caffe refuses both).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..formats.caffemodel import read_binaryproto
from ..registry import canonical_axis, count, register
from .labels import (
    DEBUG_ONLY,
    UNCHECKED,
    check_batch,
    check_label_count,
    check_labels,
    class_targets,
    whole,
)
from .losses import LossLayer, normalizer, widened

LOG_THRESHOLD = float(np.float32(1e-20))  # Caffe's kLOG_THRESHOLD is a float constant


def legacy_axes(shape, what: str) -> None:
    """Caffe reads this bottom with the num/channels/height/width accessors (at most 4 axes)."""
    if len(shape) > 4:
        raise LayerConfigError(f"{what} may have at most 4 axes, got shape {list(shape)}")


def clamped_log(p: torch.Tensor) -> torch.Tensor:
    """log(max(p, 1e-20)) whose gradient is 1/max(p, 1e-20), also where the clamp applies."""
    return torch.log(torch.where(p < LOG_THRESHOLD, p - p.detach() + LOG_THRESHOLD, p))


@register("MultinomialLogisticLoss")
class MultinomialLogisticLossLayer(LossLayer):
    """-sum_n log(max(p[n, label_n], 1e-20)) / N, the probabilities of sample n being its
    count / N values (the class index runs over channels x height x width). The label blob must
    hold one value per sample (channels, height and width 1). Takes no loss_param field."""

    params = {"loss_param": frozenset()}

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        probs, labels = bottom_shapes
        legacy_axes(probs, "the probability bottom")
        legacy_axes(labels, "the label bottom")
        if count(labels, 1) != 1:
            raise LayerConfigError(
                f"the label bottom must have channels, height and width 1, got {list(labels)}"
            )
        return [()]

    def forward(self, prob, label):
        num = prob.shape[0]
        rows = widened(prob).reshape(num, count(prob.shape, 1))
        label = label.detach().reshape(num)
        check_labels(self, label, rows.shape[1], caffe_checks=UNCHECKED)
        target, inside = class_targets(label, rows.shape[1])
        pick = (torch.arange(rows.shape[1], device=rows.device) == target.unsqueeze(1)) & (
            inside.unsqueeze(1)
        )
        picked = torch.where(pick, rows, 0.0).sum(dim=1)  # exact: one value plus zeros
        return -clamped_log(picked).sum() / num


@register("InfogainLoss")
class InfogainLossLayer(LossLayer):
    """-sum H[label, l] * log(max(softmax(x)_l, 1e-20)) over the classes l along
    ``infogain_loss_param.axis`` (default 1) and the labelled positions, normalised as
    SoftmaxWithLoss. H (K x K values, any shape) comes from ``infogain_loss_param.source``
    (a .binaryproto read at setup: not a learnable blob, so not in net.params) or is bottom 2.
    ``loss_param``: ignore_label, normalization (default VALID); the deprecated ``normalize``
    is refused, as Caffe does. Optional top 1: the softmax (no gradient flows back from it)."""

    bottoms = (2, 3)
    tops = (1, 2)
    params = {
        "infogain_loss_param": frozenset({"source", "axis"}),
        "loss_param": frozenset({"ignore_label", "normalization", "normalize"}),
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        lp, p = layer_param.loss_param, layer_param.infogain_loss_param
        if lp.HasField("normalize"):
            raise LayerConfigError(
                f"loss_param.normalize ({str(lp.normalize).lower()}) is deprecated for "
                "InfogainLoss: use loss_param.normalization"
            )
        self.mode = lp.normalization
        self.axis = p.axis
        self.register_buffer("infogain", None, persistent=False)
        if len(bottom_shapes) < 3:
            self.infogain = torch.from_numpy(self._read_source(p))

    @staticmethod
    def _read_source(p) -> np.ndarray:
        if not p.HasField("source"):
            raise LayerConfigError(
                "infogain_loss_param.source (the H matrix .binaryproto) must be given when H "
                "is not a third bottom"
            )
        try:
            return read_binaryproto(p.source).reshape(-1)
        except CaffeAlexError as exc:
            raise LayerConfigError(f"infogain_loss_param.source: {exc.message}") from None

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        scores, labels = bottom_shapes[0], bottom_shapes[1]
        axis = check_label_count(scores, labels, self.axis, "infogain_loss_param.axis")
        k = scores[axis]
        given = count(bottom_shapes[2]) if len(bottom_shapes) > 2 else self.infogain.numel()
        if given != k * k:
            where = "bottom 2" if len(bottom_shapes) > 2 else "infogain_loss_param.source"
            raise LayerConfigError(
                f"H must be {k}x{k} ({k * k} values) for {k} classes along axis {axis}, "
                f"but {where} holds {given}"
            )
        return [()] + [tuple(scores)] * (self.n_top - 1)

    def forward(self, scores, label, infogain=None):
        axis = canonical_axis(self.axis, scores.dim(), "infogain_loss_param.axis")
        shape = scores.shape
        outer, k, inner = count(shape, 0, axis), shape[axis], count(shape, axis + 1)
        x = widened(scores).reshape(outer, k, inner)
        h = self.infogain if infogain is None else infogain.detach()
        h = h.reshape(k, k).to(device=x.device, dtype=x.dtype)
        label = label.detach()
        check_labels(self, label, k, self.ignore_label, caffe_checks=DEBUG_ONLY)
        target, keep = class_targets(label.reshape(outer, inner), k)
        valid = None
        if self.ignore_label is not None:
            valid = (whole(label) != self.ignore_label).reshape(outer, inner)
            keep = keep & valid
        weights = h[target].movedim(-1, 1)  # H[label, l] at (i, l, j)
        weights = torch.where(keep.unsqueeze(1), weights, 0.0)
        prob = torch.softmax(x, dim=1)
        lsm = torch.log_softmax(x, dim=1)
        # Caffe's value log(max(p, 1e-20)); the gradient of the unclamped log-softmax, which
        # gives Caffe's backward p * sum(H[label]) - H[label].
        log_p = lsm - lsm.detach() + torch.log(prob.detach().clamp(min=LOG_THRESHOLD))
        loss = -(weights * log_p).sum()
        n_valid = None if valid is None else valid.sum()
        loss = loss / normalizer(self.mode, outer, inner, n_valid, loss)
        if self.n_top == 1:
            return loss
        return loss, prob.detach().reshape(scores.shape)
