"""Class labels as Caffe reads them, for every layer that indexes by a label (the losses,
Accuracy): truncated toward zero (``whole``, ``class_targets``); one that is neither a class nor
the ignore_label raises CaffeAlexError where that costs no device sync (CPU tensors, outside
torch.compile/export, ``check_labels``); where it is not checked it selects no class, so it can
never index out of bounds. Also the shape checks of a scores/labels pair.
"""

from __future__ import annotations

import math

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, canonical_axis, count, tracing

# What Caffe does about a label naming no class, for the message (check_labels' caffe_checks)
DEBUG_ONLY = "Caffe checks this only in debug builds (DCHECK)"
UNCHECKED = "Caffe does not check it and reads past the row"


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


def checked_targets(
    layer: CaffeLayer,
    label: torch.Tensor,
    classes: int,
    ignore: int | None = None,
    *,
    caffe_checks: str = "",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``check_labels`` then ``class_targets``, in as few ops as a small net can afford: where
    the check runs (CPU, not compiling) and every label names a class, ``inside`` is None (no
    label to mask) and the targets are one conversion; otherwise as the two calls."""
    if label.device.type == "cpu" and label.numel() and label.dtype != torch.bool and not tracing():
        if _all_classes(label, classes):
            return label.long(), None  # the float -> long conversion truncates toward zero
        check_labels(layer, label, classes, ignore, caffe_checks=caffe_checks)
    return class_targets(label, classes)


def _all_classes(label: torch.Tensor, classes: int) -> bool:
    """Every label in (-1, classes), so that truncated it names a class (NaN fails)."""
    if label.numel() <= _FEW_LABELS:  # read in Python: cheaper than two ops and their syncs
        return all(-1 < v < classes for v in label.reshape(-1).tolist())
    low, high = (v.item() for v in torch.aminmax(label))
    return low > -1 and high < classes


_FEW_LABELS = 256  # a classification batch's labels


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


def check_batch(bottom_shapes) -> None:
    """Scores and labels (or two inputs) with the same first axis, as Caffe's loss layers ask."""
    a, b = bottom_shapes[0], bottom_shapes[1]
    if not a or not b or a[0] != b[0]:
        raise LayerConfigError(
            f"the data and label should have the same first dimension: {list(a)} vs {list(b)}"
        )
