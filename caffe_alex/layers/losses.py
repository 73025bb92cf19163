"""Loss layers: SoftmaxWithLoss, EuclideanLoss, SigmoidCrossEntropyLoss.

Each returns a 0-axis loss (Caffe's loss shape). Labels and targets never get a gradient
(Caffe refuses to backpropagate to them), and the count of valid labels stays a tensor, so
nothing here waits on the device. Half-precision scores are widened to float32 first: Caffe sums
the loss in its Dtype, and a bf16 sum over a batch would be far coarser than Caffe's float.

Also the pieces every loss layer shares: ``LossLayer`` (two bottoms, loss_param's
ignore_label and normalization), ``normalizer`` (Caffe's get_normalizer) and ``widened``. Class
labels are read and checked by labels.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, canonical_axis, count, register, tracing
from .labels import DEBUG_ONLY, check_batch, check_label_count, checked_targets, whole

_Mode = caffe_pb2.LossParameter
# Caffe takes log(max(p, FLT_MIN)): a hopeless prediction costs at most -log(FLT_MIN) ~ 87.34.
_MAX_NLL = -math.log(1.1754943508222875e-38)
# the smaller of the bound and its float32 rounding (the clamp's scalar in a float32 op)
_NO_CLAMP_BELOW = min(_MAX_NLL, float(torch.tensor(_MAX_NLL, dtype=torch.float32)))
_LOSS_FIELDS = frozenset({"ignore_label", "normalization", "normalize"})


def widened(x: torch.Tensor) -> torch.Tensor:
    """Half-precision values as float32 (Caffe sums a loss in its float Dtype)."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _normalization(loss_param, default: int) -> int:
    # An explicit `normalization` wins; the legacy bool maps true -> VALID, false -> BATCH_SIZE.
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _Mode.VALID if loss_param.normalize else _Mode.BATCH_SIZE
    return default


def normalizer(mode: int, outer: int, inner: int, valid: torch.Tensor | None, like):
    """Caffe's get_normalizer, clamped to >= 1 so an all-ignored batch gives 0, not NaN."""
    if mode == _Mode.VALID and valid is not None:
        return valid.to(like.dtype).clamp(min=1)
    sizes = {_Mode.FULL: outer * inner, _Mode.VALID: outer * inner, _Mode.BATCH_SIZE: outer}
    return float(max(1, sizes.get(mode, 1)))


class LossLayer(CaffeLayer):
    """Two bottoms (scores, labels or targets), a loss top; loss_param's ignore_label and
    normalization (``default_mode`` where neither it nor the legacy normalize is set)."""

    bottoms = (2, 2)
    is_loss = True
    default_mode = _Mode.VALID

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        lp = layer_param.loss_param
        self.ignore_label = lp.ignore_label if lp.HasField("ignore_label") else None
        self.mode = _normalization(lp, self.default_mode)
        self.n_top = len(layer_param.top)


@register("SoftmaxWithLoss")
class SoftmaxWithLossLayer(LossLayer):
    """Softmax over ``softmax_param.axis`` then mean -log p[label]. ``loss_param``:
    ignore_label, normalization (default VALID), legacy normalize; caffe-segnet's
    weight_by_label_freqs with class_weighting (each element's -log p scaled by its label's
    weight; the normalizer still counts elements, unweighted). Optional top 1: the softmax."""

    tops = (1, 2)
    params = {
        "loss_param": _LOSS_FIELDS | {"weight_by_label_freqs", "class_weighting"},
        "softmax_param": frozenset({"axis"}),
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.axis = layer_param.softmax_param.axis
        lp = layer_param.loss_param
        # caffe-segnet reads class_weighting only when weight_by_label_freqs is set.
        weights = list(lp.class_weighting) if lp.weight_by_label_freqs else None
        self.register_buffer(
            "class_weights",
            None if weights is None else torch.tensor(weights, dtype=torch.float32),
            persistent=False,
        )

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        scores, labels = bottom_shapes
        check_label_count(scores, labels, self.axis, "softmax_param.axis")
        if self.class_weights is not None:
            # The fork compares with the blob's channels (axis 1), whatever softmax_param.axis.
            channels = scores[1] if len(scores) > 1 else 1
            if len(self.class_weights) != channels:
                raise LayerConfigError(
                    f"loss_param.class_weighting has {len(self.class_weights)} values but the "
                    f"scores have {channels} channels (weight_by_label_freqs needs one weight "
                    "per class)"
                )
            classes = scores[canonical_axis(self.axis, len(scores), "softmax_param.axis")]
            if classes != channels:  # the fork would index its weights past their end
                raise LayerConfigError(
                    f"loss_param.class_weighting has {channels} values (the channels) but "
                    f"softmax_param.axis {self.axis} has {classes} classes"
                )
        return [()] + [tuple(scores)] * (self.n_top - 1)

    def forward(self, scores, label):
        axis = canonical_axis(self.axis, scores.dim(), "softmax_param.axis")
        outer, inner = count(scores.shape, 0, axis), count(scores.shape, axis + 1)
        classes = scores.shape[axis]
        # (detach and reshape only where they change something: each op counts in a small net)
        label = label.detach() if label.requires_grad else label
        shape = (outer,) if inner == 1 else (outer, inner)
        labels = label if label.shape == shape else label.reshape(shape)
        target, inside = checked_targets(self, labels, classes, self.ignore_label,
                                         caffe_checks=DEBUG_ONLY)  # fmt: skip
        valid = None
        if self.ignore_label is not None:
            valid = whole(labels) != self.ignore_label
        x = widened(scores)
        norm = normalizer(self.mode, outer, inner, None if valid is None else valid.sum(), x)
        plain = inside is None and valid is None and self.class_weights is None
        if plain and inner == 1:  # classification: fewest ops
            rows = x if x.dim() == 2 else x.reshape(outer, classes)
            loss = _picked_loss(rows, target, norm)
        else:
            masks = [m if m is None else m.reshape(outer, inner) for m in (inside, valid)]
            x, target = x.reshape(outer, classes, inner), target.reshape(outer, inner)
            loss = _masked_loss(x, target, *masks, norm, self.class_weights)
        if self.n_top == 1:
            return loss
        # Caffe's backward ignores the probability top's diff.
        return loss, torch.softmax(widened(scores.detach()), dim=axis)


def _picked_loss(x, target, norm) -> torch.Tensor:
    """-log p[label] summed and divided by ``norm``, for (N, C) scores whose labels all name a
    class; log p clamped at log(FLT_MIN) as Caffe's log(max(p, FLT_MIN)), but with the
    gradient p - onehot that Caffe keeps past the clamp. Autograd's own nodes (C++) cost a
    small net less than one Python autograd.Function."""
    log_prob = torch.log_softmax(x, dim=1)
    if x.device.type == "cpu" and not tracing():
        # Each picked -log p is >= 0, so none exceeds the clamp's bound when their sum does
        # not: then the clamp is the identity and its three ops (and nodes) can go. One read
        # of a scalar, which costs no device sync on the CPU.
        rows = x.shape[0]
        if norm == rows:
            # nll_loss's own mean is the sum over the row count, bit for bit (the same
            # summation, then one division; its backward -1/N as the division's): one op
            # and one autograd node fewer. The sum is known to a rounding: skip the clamp
            # only with a margin.
            mean = F.nll_loss(log_prob, target)
            if mean.item() * rows <= _NO_CLAMP_BELOW * (1 - 1e-6):
                return mean
        else:
            total = F.nll_loss(log_prob, target, reduction="sum")
            if total.item() <= _NO_CLAMP_BELOW:
                return total / norm
    clamped = log_prob.clamp(min=-_MAX_NLL)
    if log_prob.requires_grad:
        clamped = log_prob + (clamped - log_prob).detach()
    return F.nll_loss(clamped, target, reduction="sum") / norm


def _masked_loss(x, target, inside, valid, norm, weights=None) -> torch.Tensor:
    """The general case of (outer, C, inner) scores: a bad label that went unchecked
    (``inside`` False) costs the clamp's value; an ignored one (``valid`` False) nothing;
    ``weights``: caffe-segnet's class weights, by label."""
    nll = -torch.log_softmax(x, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    # Caffe's value clamp, but with the gradient p - onehot that Caffe keeps past the clamp.
    nll = torch.where(nll > _MAX_NLL, nll - nll.detach() + _MAX_NLL, nll)
    if inside is not None:
        nll = torch.where(inside, nll, _MAX_NLL)  # an unchecked bad label: the clamp's cost
    if weights is not None:
        # The true gradient of w[label] * -log p is w[label] * (p - onehot): the fork's
        # backward, which scales the element's whole diff row by its label's weight.
        nll = nll * weights.to(nll.dtype)[target]
    if valid is not None:
        nll = torch.where(valid, nll, 0.0)
    return nll.sum() / norm


@register("EuclideanLoss")
class EuclideanLossLayer(LossLayer):
    """sum((a - b)^2) / (2 N); both bottoms get gradients. Takes no loss_param field (Caffe
    reads none for this layer)."""

    params = {"loss_param": frozenset()}

    def allow_force_backward(self, bottom: int) -> bool:
        return True  # Caffe's EuclideanLoss: both bottoms are data (no labels)

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        a, b = bottom_shapes
        if count(a, 1) != count(b, 1):
            raise LayerConfigError(f"inputs must have the same dimension: {list(a)} vs {list(b)}")
        return [()]

    def forward(self, a, b):
        a = widened(a)
        diff = a - widened(b).reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(LossLayer):
    """Cross-entropy of sigmoid(x) against targets in [0, 1]. ``loss_param``: ignore_label
    (compared with the target truncated to an integer), normalization, legacy normalize.
    Unlike the proto default, Caffe normalises this layer by BATCH_SIZE unless told otherwise."""

    params = {"loss_param": _LOSS_FIELDS}
    default_mode = _Mode.BATCH_SIZE

    def top_shapes(self, bottom_shapes):
        check_batch(bottom_shapes)
        x, t = bottom_shapes
        if count(x) != count(t):
            raise LayerConfigError(f"inputs must have the same count: {list(x)} vs {list(t)}")
        return [()]

    def forward(self, x, target):
        x = widened(x)
        t = target.detach().reshape(x.shape).to(x.dtype)
        positive = (x >= 0).to(x.dtype)
        # The overflow-free form Caffe uses: exp() only ever sees a non-positive argument.
        elem = torch.log(1 + torch.exp(x - 2 * x * positive)) - x * (t - positive)
        valid = None
        if self.ignore_label is not None:
            keep = torch.trunc(t) != self.ignore_label
            elem, valid = torch.where(keep, elem, 0.0), keep.sum()
        outer = x.shape[0]
        return elem.sum() / normalizer(self.mode, outer, count(x.shape, 1), valid, elem)
