"""SmoothL1Loss: Fast/Faster R-CNN's box regression loss (rbgirshick/caffe-fast-rcnn).

loss = sum(w_out * f(w_in * (x - t))) / num, with f(d) = 0.5 * sigma^2 * d^2 where
|d| < 1 / sigma^2 and |d| - 0.5 / sigma^2 elsewhere, num the first axis of the predictions.
Bottoms: predictions x, targets t, and optionally inside weights w_in and outside weights
w_out (both or neither). Honours ``smooth_l1_loss_param.sigma`` (default 1).
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


def _legacy(shape) -> tuple[int, int, int, int]:
    # Blob::LegacyShape: (num, channels, height, width), a missing axis counting as 1
    dims = tuple(shape) + (1,) * (4 - len(shape))
    return dims[:4] if len(shape) <= 4 else (-1, -1, -1, -1)


@register("SmoothL1Loss")
class SmoothL1LossLayer(CaffeLayer):
    """The fork's forward and backward are those of the formula: the gradient reaches the
    predictions (and, negated, the targets: the fork propagates to both), never the weights.
    ``loss_param`` normalization is not read: the fork always divides by num."""

    bottoms = (2, 4)
    is_loss = True
    params = {"smooth_l1_loss_param": frozenset({"sigma"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        if len(bottom_shapes) == 3:
            raise LayerConfigError(
                "If weights are used, must specify both inside and outside weights "
                "(SmoothL1Loss takes 2 bottoms or 4)"
            )
        sigma = float(layer_param.smooth_l1_loss_param.sigma)
        if sigma == 0:
            raise LayerConfigError("smooth_l1_loss_param.sigma must not be 0")
        # sigma^2 in the blob's float, as the fork keeps it
        self.sigma2 = float(torch.tensor(sigma * sigma, dtype=torch.float32))

    def top_shapes(self, bottom_shapes):
        shapes = [tuple(s) for s in bottom_shapes]
        first = shapes[0]
        if len(first) > 4 or any(len(s) > 4 for s in shapes):
            raise LayerConfigError(
                f"SmoothL1Loss reads (num, channels, height, width) blobs of at most 4 axes, "
                f"got {[list(s) for s in shapes]}"
            )
        if shapes[1][:1] != first[:1]:
            raise LayerConfigError(
                "the data and label should have the same first dimension: "
                f"{list(first)} vs {list(shapes[1])}"
            )
        names = ("targets", "inside weights", "outside weights")
        for name, shape in zip(names, shapes[1:]):
            # the fork compares channels, height and width; a num other than the predictions'
            # would make it read past the smaller blob, so that is refused too
            if _legacy(shape) != _legacy(first):
                raise LayerConfigError(
                    f"{name} {list(shape)} must match the predictions {list(first)} in "
                    "(num, channels, height, width)"
                )
        return [()]

    def allow_force_backward(self, bottom: int) -> bool:
        return True  # the fork's SmoothL1LossLayer: every bottom may take force_backward

    def forward(self, x, target, inside=None, outside=None):
        # half precision is widened (as the other losses do): the sum runs in float32 at least
        low = x.is_floating_point() and x.element_size() < 4
        diff = x.float() - target.float() if low else x - target
        if inside is not None:
            diff = diff * inside.detach().to(diff.dtype)
        s2 = self.sigma2
        small = diff.abs() < 1.0 / s2
        error = torch.where(small, 0.5 * s2 * diff * diff, diff.abs() - 0.5 / s2)
        if outside is not None:
            error = error * outside.detach().to(error.dtype)
        num = x.shape[0] if x.dim() else 1
        return error.sum() / num
