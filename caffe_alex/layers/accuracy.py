"""Accuracy: the fraction of labelled positions whose true class is among the top_k scores."""

from __future__ import annotations

import math

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, count, register, tracing
from .labels import DEBUG_ONLY, check_label_count, checked_targets, whole


@register("Accuracy")
class AccuracyLayer(CaffeLayer):
    """``accuracy_param``: top_k (default 1), axis (the class axis, default 1), ignore_label.

    Top 0 is a 0-axis scalar; the optional top 1 holds the accuracy of each class (0 for a class
    with no sample). The true class ranks by how many scores are >= its own, itself included,
    so a tie with another class counts as a miss, as in Caffe. No backward: outputs are detached.
    A label that names no class raises CaffeAlexError (``labels.checked_targets``); where that is
    not checked (off the CPU, or compiling) it counts as a miss of no class.
    """

    bottoms = (2, 2)
    tops = (1, 2)
    params = {"accuracy_param": frozenset({"top_k", "axis", "ignore_label"})}
    pure = True  # a train net's Accuracy runs where its output is shown (net.loss_only)

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.accuracy_param
        self.top_k = p.top_k
        self.axis = p.axis
        self.ignore_label = p.ignore_label if p.HasField("ignore_label") else None
        self.n_top = len(layer_param.top)

    def top_shapes(self, bottom_shapes):
        scores, labels = bottom_shapes
        if count(labels) == 0 or self.top_k > count(scores) // count(labels):
            raise LayerConfigError(
                f"top_k ({self.top_k}) must be at most the number of classes "
                f"(scores {list(scores)}, labels {list(labels)})"
            )
        axis = check_label_count(scores, labels, self.axis, "accuracy_param.axis")
        return [()] + [(scores[axis],)] * (self.n_top - 1)

    def forward(self, scores, label):
        axis = canonical_axis(self.axis, scores.dim(), "accuracy_param.axis")
        outer, inner = count(scores.shape, 0, axis), count(scores.shape, axis + 1)
        classes = scores.shape[axis]
        # (detach and reshape only where they change something: each op counts in a small net)
        if inner == 1 and self.n_top == 1 and scores.numel() <= _IN_PYTHON:
            accuracy = self._in_python(scores, label, outer, classes)
            if accuracy is not None:
                return accuracy
        x = scores.detach() if scores.requires_grad else scores
        label = label.detach() if label.requires_grad else label
        labels = label if label.shape == (outer, inner) else label.reshape(outer, inner)
        target, inside = checked_targets(self, labels, classes, self.ignore_label,
                                         caffe_checks=DEBUG_ONLY)  # fmt: skip
        valid = None  # None: every position is labelled (no ignore_label)
        if self.ignore_label is not None:
            valid = (whole(label) != self.ignore_label).reshape(outer, inner)
        # a hit: fewer than top_k other scores >= the true one (which counts itself once)
        if inner == 1 and valid is None and inside is None and self.n_top == 1:
            rows = x if x.dim() == 2 else x.reshape(outer, classes)  # classification scores
            hit = (rows >= rows.gather(1, target)).sum(dim=1) <= self.top_k
        else:
            if x.shape != (outer, classes, inner):
                x = x.reshape(outer, classes, inner)
            hit = (x >= x.gather(1, target.unsqueeze(1))).sum(dim=1) <= self.top_k
        counted = _both(valid, inside)
        if counted is not None:
            hit = hit & counted
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32  # >= float
        n_valid = float(outer * inner) if valid is None else valid.sum().to(dtype)
        if valid is None:
            accuracy = hit.sum().to(dtype) / max(n_valid, 1.0)
        else:  # no labelled position gives 0
            accuracy = hit.sum().to(dtype) / n_valid.clamp(min=1)
        if self.n_top == 1:
            return accuracy
        if counted is None:
            counted = torch.ones_like(target, dtype=torch.bool)
        return accuracy, self._per_class(target, counted, hit, classes, dtype)

    def _in_python(self, scores, label, outer: int, classes: int) -> torch.Tensor | None:
        """The accuracy of a few classification scores, counted in Python: a handful of
        scores costs less read out than the seven tensor ops of the general path (the
        brewing-logreg net's 10 x 2: 7 against 50 us). Exact: float32 scores compare as
        doubles in the same order, and the float32 rounding of hits / count in double is the
        float32 division's result. None where it cannot answer (not on the CPU, tracing, a
        label naming no class), for the tensor path to handle or refuse."""
        if scores.device.type != "cpu" or label.device.type != "cpu" or tracing():
            return None
        # (tolist reads a tensor that records a gradient as it is; reshape only where needed)
        rows = (scores if scores.dim() == 2 else scores.reshape(outer, classes)).tolist()
        labels = (label if label.dim() == 1 else label.reshape(-1)).tolist()
        top_k, ignore = self.top_k, self.ignore_label
        hits = counted = 0
        for row, value in zip(rows, labels):
            if not -1 < value < classes:  # NaN, a label naming no class: not here
                if ignore is not None and math.isfinite(value) and int(value) == ignore:
                    continue
                return None
            target = int(value)  # truncated toward zero, as Caffe's static_cast<int>
            if ignore is not None and target == ignore:
                continue
            counted += 1
            true_score, ranked = row[target], 0
            for other in row:  # a tie with another class ranks above the true one
                if other >= true_score:
                    ranked += 1
            if ranked <= top_k:
                hits += 1
        dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
        return torch.tensor(hits / counted if counted else 0.0, dtype=dtype)

    @staticmethod
    def _per_class(target, valid, hit, classes: int, dtype) -> torch.Tensor:
        flat = target.reshape(-1)
        zeros = torch.zeros(classes, dtype=dtype, device=target.device)
        seen = zeros.scatter_add(0, flat, valid.reshape(-1).to(dtype))
        right = zeros.scatter_add(0, flat, hit.reshape(-1).to(dtype))
        return torch.where(seen > 0, right / seen.clamp(min=1), 0.0)


# Scores up to this many are counted in Python (``_in_python``): about 60 ns per score and
# 0.3 us per row there, against 5-10 us per tensor op.
_IN_PYTHON = 256


def _both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The and of two optional masks (None: all true)."""
    if a is None or b is None:
        return b if a is None else a
    return a & b
