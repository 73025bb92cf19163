"""Reorg and Region of the YOLOv2 Caffe port quhezheng/caffe_yolo_v2 (the same two layers are in
its copies: lwplw/caffe_yolov2, and Reorg in gklz1982/caffe-yolov2), reorg_param and
region_param named as there.

Reorg is Darknet's reorg, which is not a plain space_to_depth: the bottom's memory is read as
[C / s^2, H * s, W * s], each s x s block is spread over s^2 channel groups, and the result,
laid out [C, H, W], is given the top shape [C * s^2, H / s, W / s]. OpenCV's Reorg computes the
same. reverse: true runs the port's loops the other way: bottom [C, H, W] written into a top
[C / s^2, H * s, W * s]. Each direction indexes its own bottom's shape, so reverse applied to a
reorged top is another reordering, not the way back (as in Darknet).

Region is the port's inference-only head: the [N, C, H, W] bottom is transposed to
[N, H * W, C] memory (one row of boxes_of_each_grid * (coords + 1 + classes) values per cell),
the objectness (entry 4 of each box) goes through the logistic and, with softmax: true, the
class scores through a softmax. x, y, w, h stay raw (the port's detect script decodes them with
the anchors). The top keeps the bottom's shape, holding that memory.

Neither port layer has a working backward: Reorg's CPU code reorders a buffer it never fills
and its CUDA code writes into the top's diff, Region's leaves the bottom's diff alone. The
bottom's gradient is zero here, as it stays zero there.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


class _NoGradient(torch.autograd.Function):
    """Runs ``fn`` on the bottom; the bottom's gradient is zero (the port layers' backward)."""

    @staticmethod
    def forward(ctx, x, fn):
        ctx.shape = x.shape
        return fn(x)

    @staticmethod
    def backward(ctx, dy):
        return dy.new_zeros(ctx.shape), None


def _not_in_place(layer_param) -> None:
    if layer_param.top and layer_param.bottom and layer_param.top[0] == layer_param.bottom[0]:
        raise LayerConfigError(
            f"does not allow in-place computation (top '{layer_param.top[0]}' is its bottom)"
        )


def _four_axes(shape) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise LayerConfigError(f"needs a 4-D (N, C, H, W) bottom, got shape {list(shape)}")
    return tuple(shape)


@register("Reorg")
class ReorgLayer(CaffeLayer):
    """Darknet's reorg with stride s (required, as the port checks) and reverse."""

    params = {"reorg_param": frozenset({"stride", "reverse"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        _not_in_place(layer_param)
        rp = layer_param.reorg_param
        if not rp.HasField("stride"):
            raise LayerConfigError("reorg_param.stride is required")
        if rp.stride <= 0:
            raise LayerConfigError(f"reorg_param.stride must be positive, got {rp.stride}")
        self.stride, self.reverse = rp.stride, rp.reverse

    def top_shapes(self, bottom_shapes):
        n, c, h, w = _four_axes(bottom_shapes[0])
        s = self.stride
        if self.reverse:
            if c % (s * s):
                raise LayerConfigError(
                    f"reverse reorg with stride {s} needs channels divisible by {s * s}, got {c}"
                )
            return [(n, c // (s * s), h * s, w * s)]
        if c % (s * s) or h % s or w % s:
            raise LayerConfigError(
                f"reorg with stride {s} needs channels divisible by {s * s} and height and "
                f"width divisible by {s}, got bottom shape {[n, c, h, w]}"
            )
        return [(n, c * s * s, h // s, w // s)]

    def forward(self, x):
        return _NoGradient.apply(x, self._reorder)

    def _reorder(self, x):
        n, c, h, w = x.shape
        s, groups = self.stride, c // (self.stride * self.stride)
        if self.reverse:
            # bottom channel (oy * s + ox) * groups + g, cell (i, j) -> top [g, i*s+oy, j*s+ox]
            top = x.reshape(n, s, s, groups, h, w).permute(0, 3, 4, 1, 5, 2)
            return top.reshape(n, groups, h * s, w * s)
        # The bottom's memory read as [groups, h, s, w, s] (that is [C / s^2, H * s, W * s]);
        # top [C, H, W] memory: channel (oy * s + ox) * groups + g at (i, j) <- [g, i, oy, j, ox]
        top = x.reshape(n, groups, h, s, w, s).permute(0, 3, 5, 1, 2, 4)
        return top.reshape(n, c * s * s, h // s, w // s)


@register("Region")
class RegionLayer(CaffeLayer):
    """The port's Region: [N, H * W, boxes, coords + 1 + classes] memory in a top of the bottom's
    shape; logistic on each box's objectness, softmax over its classes when softmax is set.
    ``anchors`` is accepted and unused, as in the port."""

    params = {
        "region_param": frozenset({"classes", "coords", "boxes_of_each_grid", "softmax", "anchors"})
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        _not_in_place(layer_param)
        rp = layer_param.region_param
        self.classes, self.coords = rp.classes, rp.coords
        self.boxes, self.softmax = rp.boxes_of_each_grid, rp.softmax
        if self.coords != 4:
            # The port's loops address the objectness at entry 4 and the classes from entry 5.
            raise LayerConfigError(
                f"region_param.coords {self.coords}: the port's Region works with coords 4 "
                "only (it reads the objectness at entry 4)"
            )
        if self.boxes <= 0 or self.classes <= 0:
            raise LayerConfigError(
                f"region_param.boxes_of_each_grid ({self.boxes}) and classes ({self.classes}) "
                "must be positive"
            )

    def top_shapes(self, bottom_shapes):
        n, c, h, w = _four_axes(bottom_shapes[0])
        size = self.coords + 1 + self.classes
        if c != self.boxes * size:
            raise LayerConfigError(
                f"bottom has {c} channels but region_param asks for boxes_of_each_grid "
                f"{self.boxes} x (coords {self.coords} + 1 + classes {self.classes}) = "
                f"{self.boxes * size}"
            )
        return [(n, c, h, w)]

    def forward(self, x):
        return _NoGradient.apply(x, self._activate)

    def _activate(self, x):
        n, c, h, w = x.shape
        cells = x.reshape(n, c, h * w).transpose(1, 2).reshape(n, h * w, self.boxes, -1)
        parts = [cells[..., :4], torch.sigmoid(cells[..., 4:5])]
        scores = cells[..., 5:]
        parts.append(torch.softmax(scores, dim=-1) if self.softmax else scores)
        return torch.cat(parts, dim=-1).reshape(n, c, h, w)
