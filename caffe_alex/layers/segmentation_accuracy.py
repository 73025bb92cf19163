"""DeepLab v2's SegAccuracy: a confusion matrix of each pixel's predicted class (the channel
with the highest score) against its label, reported as three numbers.

Top (1, 1, 1, 3): pixel accuracy (the matrix's diagonal over its sum, 0 when empty), the mean
recall of the classes that occur among the labels (0 when none does), and the mean IoU over
all classes, where a class neither labelled nor predicted counts as 1 (the fork's
ConfusionMatrix accuracy, avgRecall(false) and avgJaccard). The fork reports all three whatever
seg_accuracy_param.metric says. With ``reset: false`` the matrix keeps counting across forward
passes (the fork clears it only when reset is true, its default): the numbers then cover every
batch this layer has seen.
"""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, register, tracing
from .labels import whole


def _legacy(shape) -> tuple[int, int, int, int]:
    """Caffe's num(), channels(), height(), width() of a blob of at most 4 axes."""
    if len(shape) > 4:
        raise LayerConfigError(f"cannot use legacy accessors on a {len(shape)}-axis blob")
    return tuple(shape) + (1,) * (4 - len(shape))


@register("SegAccuracy")
class SegAccuracyLayer(CaffeLayer):
    """``seg_accuracy_param``: ignore_label (repeated: labels left out of the matrix), reset
    (default true: count this batch only), metric (read by no code of the fork; all three
    numbers are reported). Scores (N, C, H, W), labels (N, 1, H, W). A label that is neither
    a class nor ignored stops the fork; here it raises CaffeAlexError on CPU tensors (where the
    check costs no device sync) and is left out of the matrix elsewhere. No backward."""

    bottoms = (2, 2)
    params = {"seg_accuracy_param": frozenset({"ignore_label", "reset", "metric"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.seg_accuracy_param
        self.ignore = sorted(set(p.ignore_label))
        self.reset = p.reset
        self.classes = _legacy(bottom_shapes[0])[1] if bottom_shapes else 1
        # actual class x predicted class; integer counts, which .half() or .double() of the
        # net leave alone
        self.register_buffer(
            "confusion", torch.zeros(self.classes, self.classes, dtype=torch.long), False
        )

    def top_shapes(self, bottom_shapes):
        n, c, h, w = _legacy(bottom_shapes[0])
        ln, lc, lh, lw = _legacy(bottom_shapes[1])
        if c != self.classes:
            raise LayerConfigError(
                f"the scores have {c} channels but the layer was set up for {self.classes} "
                "(the fork sizes its confusion matrix once)"
            )
        if n != ln:
            raise LayerConfigError(f"the data ({n}) and label ({ln}) should have the same number")
        if lc != 1:
            raise LayerConfigError(f"the label should have one channel, not {lc}")
        if (h, w) != (lh, lw):
            raise LayerConfigError(
                f"the data ({h}x{w}) and label ({lh}x{lw}) should have the same height and width"
            )
        return [(1, 1, 1, 3)]

    def forward(self, scores, label):
        n, c, h, w = _legacy(scores.shape)
        x = scores.detach().reshape(n, c, h * w)
        # std::partial_sort of (score, class) pairs with greater<>: on a tie the higher class
        predicted = (c - 1) - torch.argmax(x.flip(1), dim=1)
        truth = whole(label.detach().reshape(n, h * w))
        ignored = torch.zeros_like(truth, dtype=torch.bool)
        for value in self.ignore:
            ignored |= truth == value
        inside = (truth >= 0) & (truth < c)
        self._check(truth, ignored, inside, w)
        counted = inside & ~ignored
        cell = torch.where(counted, truth, 0).long() * c + predicted
        if self.reset:
            self.confusion.zero_()
        flat = self.confusion.view(-1)
        flat.index_add_(0, cell.reshape(-1), counted.reshape(-1).long())
        dtype = torch.promote_types(scores.dtype, torch.float32)
        return self._report(self.confusion.double()).to(dtype).reshape(1, 1, 1, 3)

    @staticmethod
    def _report(m: torch.Tensor) -> torch.Tensor:
        diag, rows, cols = m.diagonal(), m.sum(1), m.sum(0)
        total = m.sum()
        accuracy = torch.where(total > 0, diag.sum() / total.clamp(min=1), 0.0)
        present = rows > 0
        recall = torch.where(present, diag / rows.clamp(min=1), 0.0).sum()
        n_present = present.sum()
        mean_recall = torch.where(n_present > 0, recall / n_present.clamp(min=1), 0.0)
        union = rows + cols - diag
        jaccard = torch.where(diag == union, 1.0, diag / union.clamp(min=1))
        return torch.stack([accuracy, mean_recall, jaccard.mean()])

    def _check(self, truth, ignored, inside, width: int) -> None:
        """The fork's LOG(FATAL) on an unexpected label, where it costs no device sync."""
        if truth.device.type != "cpu" or truth.numel() == 0 or tracing():
            return
        bad = ~(ignored | inside)
        if not bool(bad.any()):
            return
        item, position = (int(i) for i in torch.nonzero(bad)[0])
        value = truth[item, position].item()
        shown = int(value) if value == value and abs(value) < 2**53 else value
        ignored_text = f" or an ignore_label {self.ignore}" if self.ignore else ""
        error = CaffeAlexError(
            f"unexpected label {shown} (item {item}, row {position // width}, column "
            f"{position % width}): expected an integer in [0, {self.classes - 1}]{ignored_text}",
            layer=self.name,
            layer_type=self.type_name,
        )
        error.item, error.label = item, value
        raise error
