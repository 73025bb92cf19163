"""Loss layers: SoftmaxWithLoss, EuclideanLoss, SigmoidCrossEntropyLoss.

Each returns a 0-axis loss (Caffe's loss shape). Labels and targets never get a gradient
(Caffe refuses to backpropagate to them), and the count of valid labels stays a tensor, so
nothing here waits on the device. Half-precision scores are widened to float32 first: Caffe sums
the loss in its Dtype, and a bf16 sum over a batch would be far coarser than Caffe's float.

Class labels (``class_targets``, shared by every layer that indexes by a label) are read as
Caffe reads them, truncated toward zero. One that is neither a class nor the ignore_label raises
CaffeAlexError where that costs no device sync (CPU tensors, outside torch.compile/export); where
it is not checked it selects no class, so it can never index out of bounds.
"""

from __future__ import annotations

import math

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, canonical_axis, count, register
from .indexing import tracing

_Mode = caffe_pb2.LossParameter
# Caffe takes log(max(p, FLT_MIN)): a hopeless prediction costs at most -log(FLT_MIN) ~ 87.34.
_MAX_NLL = -math.log(1.1754943508222875e-38)
_LOSS_FIELDS = frozenset({"ignore_label", "normalization", "normalize"})
# What Caffe does about a label naming no class, for the message (check_labels' caffe_checks)
DEBUG_ONLY = "Caffe checks this only in debug builds (DCHECK)"
UNCHECKED = "Caffe does not check it and reads past the row"


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def _normalization(loss_param, default: int) -> int:
    # An explicit `normalization` wins; the legacy bool maps true -> VALID, false -> BATCH_SIZE.
    if loss_param.HasField("normalization"):
        return loss_param.normalization
    if loss_param.HasField("normalize"):
        return _Mode.VALID if loss_param.normalize else _Mode.BATCH_SIZE
    return default


def _normalizer(mode: int, outer: int, inner: int, valid: torch.Tensor | None, like):
    """Caffe's get_normalizer, clamped to >= 1 so an all-ignored batch gives 0, not NaN."""
    if mode == _Mode.VALID and valid is not None:
        return valid.to(like.dtype).clamp(min=1)
    sizes = {_Mode.FULL: outer * inner, _Mode.VALID: outer * inner, _Mode.BATCH_SIZE: outer}
    return float(max(1, sizes.get(mode, 1)))


def whole(label: torch.Tensor) -> torch.Tensor:
    """Labels truncated toward zero, as Caffe's static_cast<int> reads them (still floats, so
    NaN, inf and huge values stay what they are instead of wrapping)."""
    return torch.trunc(label) if label.is_floating_point() else label


def class_targets(label: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target, inside)``: each label truncated toward zero as a long index, 0 where it names
    no class in [0, classes) (NaN, inf, out of range), and the bool mask of those that do.
    Nothing here indexes or waits on the device."""
    whole_labels = whole(label)
    inside = (whole_labels >= 0) & (whole_labels < classes)
    return torch.where(inside, whole_labels, 0).long(), inside


def check_labels(
    layer: CaffeLayer,
    label: torch.Tensor,
    classes: int,
    ignore: int | None = None,
    *,
    caffe_checks: str = "",
) -> None:
    """Refuse a label that is neither a class in [0, classes) (after truncation) nor ``ignore``.

    ``label`` has the batch axis first; the error names the layer and the value, and carries
    ``item`` (the index along that axis, for the caller to map to a record) and ``label``.
    ``caffe_checks`` says what Caffe itself does about it, for the message. Only on CPU
    tensors outside torch.compile/export, where the test needs no device sync; elsewhere
    ``class_targets`` makes such a label select no class."""
    if label.device.type != "cpu" or label.numel() == 0 or tracing():
        return
    whole_labels = whole(label)
    bad = ~((whole_labels >= 0) & (whole_labels < classes))
    if ignore is not None:
        bad &= whole_labels != ignore
    if not bool(bad.any()):
        return
    position = int(torch.nonzero(bad.reshape(-1))[0, 0])
    value, shown = _label_value(label.reshape(-1)[position])
    per_item = label.numel() // label.shape[0] if label.dim() else 1
    item = position // max(per_item, 1)
    allowed = f"an integer in [0, {classes - 1}]" + (
        f" or the ignore_label {ignore}" if ignore is not None else ""
    )
    note = f"; {caffe_checks}" if caffe_checks else ""
    error = CaffeAlexError(
        f"label {shown} out of range (item {item} of the batch): expected {allowed}{note}",
        layer=layer.name,
        layer_type=layer.type_name,
    )
    error.item, error.label = item, value
    raise error


def _label_value(label: torch.Tensor) -> tuple[int | float, str]:
    """A label as a Python number and as text: an integer as one, anything else in the
    shortest form its own precision needs (a float32 1e30 is "1e+30", not 17 digits)."""
    value = label.item()
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        if abs(value) < 2**53:
            return int(value), str(int(value))
    if isinstance(value, float) and label.dtype != torch.float64:
        return value, str(label.to(torch.float32).numpy())
    return value, str(value)


def check_label_count(scores, labels, axis: int, axis_field: str) -> int:
    """One label per prediction: every position of ``scores`` except along the class ``axis``
    (Caffe's outer_num * inner_num). Returns the canonical axis."""
    axis = canonical_axis(axis, len(scores), axis_field)
    n = count(scores, 0, axis) * count(scores, axis + 1)
    if n != count(labels):
        raise LayerConfigError(
            f"number of labels must match number of predictions: scores {list(scores)} with "
            f"axis {axis} need {n} labels, label blob {list(labels)} has {count(labels)}"
        )
    return axis


def _check_batch(bottom_shapes) -> None:
    a, b = bottom_shapes[0], bottom_shapes[1]
    if not a or not b or a[0] != b[0]:
        raise LayerConfigError(
            f"the data and label should have the same first dimension: {list(a)} vs {list(b)}"
        )


class _LossLayer(CaffeLayer):
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
class SoftmaxWithLossLayer(_LossLayer):
    """Softmax over ``softmax_param.axis`` then mean -log p[label]. ``loss_param``:
    ignore_label, normalization (default VALID), legacy normalize. Optional top 1: the softmax."""

    tops = (1, 2)
    params = {"loss_param": _LOSS_FIELDS, "softmax_param": frozenset({"axis"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.axis = layer_param.softmax_param.axis

    def top_shapes(self, bottom_shapes):
        _check_batch(bottom_shapes)
        scores, labels = bottom_shapes
        check_label_count(scores, labels, self.axis, "softmax_param.axis")
        return [()] + [tuple(scores)] * (self.n_top - 1)

    def forward(self, scores, label):
        axis = canonical_axis(self.axis, scores.dim(), "softmax_param.axis")
        outer, inner = count(scores.shape, 0, axis), count(scores.shape, axis + 1)
        classes = scores.shape[axis]
        x = _wide(scores).reshape(outer, classes, inner)
        label = label.detach()
        check_labels(self, label, classes, self.ignore_label, caffe_checks=DEBUG_ONLY)
        target, inside = class_targets(label.reshape(outer, inner), classes)
        valid = None if self.ignore_label is None else whole(label) != self.ignore_label
        if valid is not None:
            valid = valid.reshape(outer, inner)
        nll = -torch.log_softmax(x, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        # Caffe's value clamp, but with the gradient p - onehot that Caffe keeps past the clamp.
        nll = torch.where(nll > _MAX_NLL, nll - nll.detach() + _MAX_NLL, nll)
        nll = torch.where(inside, nll, _MAX_NLL)  # an unchecked bad label: the clamp's cost
        if valid is not None:
            nll = torch.where(valid, nll, 0.0)
            valid = valid.sum()
        loss = nll.sum() / _normalizer(self.mode, outer, inner, valid, nll)
        if self.n_top == 1:
            return loss
        # Caffe's backward ignores the probability top's diff.
        return loss, torch.softmax(_wide(scores.detach()), dim=axis)


@register("EuclideanLoss")
class EuclideanLossLayer(_LossLayer):
    """sum((a - b)^2) / (2 N); both bottoms get gradients. Takes no loss_param field (Caffe
    reads none for this layer)."""

    params = {"loss_param": frozenset()}

    def top_shapes(self, bottom_shapes):
        _check_batch(bottom_shapes)
        a, b = bottom_shapes
        if count(a, 1) != count(b, 1):
            raise LayerConfigError(f"inputs must have the same dimension: {list(a)} vs {list(b)}")
        return [()]

    def forward(self, a, b):
        a = _wide(a)
        diff = a - _wide(b).reshape(a.shape)
        return (diff * diff).sum() / a.shape[0] / 2


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLossLayer(_LossLayer):
    """Cross-entropy of sigmoid(x) against targets in [0, 1]. ``loss_param``: ignore_label
    (compared with the target truncated to an integer), normalization, legacy normalize.
    Unlike the proto default, Caffe normalises this layer by BATCH_SIZE unless told otherwise."""

    params = {"loss_param": _LOSS_FIELDS}
    default_mode = _Mode.BATCH_SIZE

    def top_shapes(self, bottom_shapes):
        _check_batch(bottom_shapes)
        x, t = bottom_shapes
        if count(x) != count(t):
            raise LayerConfigError(f"inputs must have the same count: {list(x)} vs {list(t)}")
        return [()]

    def forward(self, x, target):
        x = _wide(x)
        t = target.detach().reshape(x.shape).to(x.dtype)
        positive = (x >= 0).to(x.dtype)
        # The overflow-free form Caffe uses: exp() only ever sees a non-positive argument.
        elem = torch.log(1 + torch.exp(x - 2 * x * positive)) - x * (t - positive)
        valid = None
        if self.ignore_label is not None:
            keep = torch.trunc(t) != self.ignore_label
            elem, valid = torch.where(keep, elem, 0.0), keep.sum()
        outer = x.shape[0]
        return elem.sum() / _normalizer(self.mode, outer, count(x.shape, 1), valid, elem)
