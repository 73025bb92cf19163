"""Region-based detectors' layers: ROIPooling (Fast/Faster R-CNN), PSROIPooling (R-FCN) and
Proposal (a region proposal network's proposals, as py-faster-rcnn's Python layer makes them).

ROIPooling follows rbgirshick/caffe-fast-rcnn, PSROIPooling daijifeng001/caffe-rfcn, Proposal
py-faster-rcnn's lib/rpn (proposal_layer.py, generate_anchors.py) with OpenCV's
``proposal_param`` for its settings. A region of interest is a row (batch index, x1, y1, x2, y2)
in input-image pixels; ``spatial_scale`` maps it onto the feature map.
"""

from __future__ import annotations

import math

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, register, tracing
from .indexing import first_bad

# Elements gathered at once by ROIPooling (rois x bins x window x channels), bounding the
# memory of one chunk whatever the number of rois: on a CPU a chunk that stays in cache was
# several times faster (VGG16's 300 rois x 512 channels); on a GPU, fewer and larger chunks.
_GATHER_BUDGET = {"cpu": 1 << 20}
_GATHER_BUDGET_DEVICE = 1 << 24


def c_round(x: torch.Tensor) -> torch.Tensor:
    """C's round(): halves away from zero (torch.round rounds them to even)."""
    whole = torch.trunc(x)
    return torch.where((x - whole).abs() >= 0.5, whole + torch.sign(x), whole)


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    # The forks compute box geometry in the blob's Dtype: float, or double for double nets.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_roi_shapes(bottom_shapes, what: str) -> tuple[int, ...]:
    data, rois = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
    if len(data) != 4:
        raise LayerConfigError(
            f"{what} input must have 4 axes (num, channels, height, width), got {list(data)}"
        )
    if not rois or math.prod(rois[1:]) != 5:
        raise LayerConfigError(
            f"rois (bottom 1) must be R x 5 (batch index, x1, y1, x2, y2), got {list(rois)}"
        )
    return data


def batch_indices(layer: CaffeLayer, rois: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Each roi's batch index as Caffe reads it (truncated toward zero). One outside
    [0, batch_size) is refused naming the layer and the value (caffe-fast-rcnn's CPU code stops
    on it with a CHECK, its GPU code and R-FCN's read outside the blob); while torch.compile or
    export traces, where no host check is possible, it is clamped into range instead."""
    index = torch.trunc(rois[:, 0])
    bad = ~((index >= 0) & (index < batch_size))
    if not tracing():
        found = first_bad(bad, rois[:, 0])
        if found is not None:
            position, value = found
            raise CaffeAlexError(
                f"roi {position} has batch index {value:g}, outside [0, {batch_size - 1}] "
                f"(the data blob holds {batch_size} item(s))",
                layer=layer.name,
                layer_type=layer.type_name,
            )
    return index.clamp(0, max(batch_size - 1, 0)).long()


# -- ROIPooling -------------------------------------------------------------------------


def roi_pool_bins(rois, scale: float, pooled_h: int, pooled_w: int, height: int, width: int):
    """caffe-fast-rcnn's bins: each corner rounded after scaling, a roi at least one cell each
    way, bin b spanning [floor(b * size / pooled), ceil((b + 1) * size / pooled)) from the
    roi's start (in the blob's Dtype), clipped to the map. Returns the clipped
    (hstart, hend) [R, pooled_h], (wstart, wend) [R, pooled_w] and, per roi, whether its corners
    are in order (caffe-fast-rcnn's backward gives a roi whose end precedes its start none)."""
    dtype = rois.dtype
    corner = c_round(rois[:, 1:5] * torch.tensor(scale, dtype=torch.float32).to(dtype)).long()
    start_w, start_h, end_w, end_h = corner.unbind(1)
    ordered = (end_w >= start_w) & (end_h >= start_h)

    def axis(start, end, pooled, limit):
        size = (end - start + 1).clamp(min=1).to(dtype)
        bin_size = size / pooled
        b = torch.arange(pooled, dtype=dtype, device=rois.device)
        lo = torch.floor(b[None] * bin_size[:, None]).long() + start[:, None]
        hi = torch.ceil((b[None] + 1) * bin_size[:, None]).long() + start[:, None]
        return lo.clamp(0, limit), hi.clamp(0, limit)

    hs, he = axis(start_h, end_h, pooled_h, height)
    ws, we = axis(start_w, end_w, pooled_w, width)
    return hs, he, ws, we, ordered


def roi_max_pool(x, batch, hs, he, ws, we, with_argmax: bool = True):
    """Max over each bin, channels last: (values [R, PH, PW, C], argmax [R, PH, PW, C] or None
    without ``with_argmax``) where argmax is h * W + w of the first maximum in row-major order
    (caffe-fast-rcnn's strict ``>`` scan) and -1 with value 0 for an empty bin.

    Each bin is read as a window of the largest bin among the rois of its chunk; the rois go
    in order of their largest bin, so the windows of a chunk waste little, and a chunk holds
    at most _GATHER_BUDGET elements. Cells outside a bin read a row of -inf."""
    n, c, h, w = x.shape
    r, ph, pw = hs.shape[0], hs.shape[1], ws.shape[1]
    values = x.new_zeros(r, ph, pw, c)
    argmax = torch.full((r, ph, pw, c) if with_argmax else (0,), -1, device=x.device)
    if r == 0 or c == 0:
        return values, argmax if with_argmax else None
    tall = (he - hs).clamp(min=0).amax(dim=1)
    wide = (we - ws).clamp(min=0).amax(dim=1)
    order = torch.argsort(tall * wide)
    sizes = torch.stack([tall, wide], dim=1)[order].tolist()  # one host sync
    budget = _GATHER_BUDGET.get(x.device.type, _GATHER_BUDGET_DEVICE)
    sentinel = n * h * w
    table = torch.cat([x.permute(0, 2, 3, 1).reshape(sentinel, c), x.new_full((1, c), -math.inf)])
    for lo, hi, kh, kw in _chunks(sizes, ph * pw * c, budget):
        if kh and kw:
            pick = order[lo:hi]
            best, at = _window_max(
                table, (h, w), batch[pick], hs[pick], he[pick], ws[pick], we[pick], kh, kw,
                with_argmax,
            )  # fmt: skip
            if with_argmax:
                argmax[pick] = at
            values[pick] = best
    nonempty = ((he > hs)[:, :, None] & (we > ws)[:, None, :])[..., None]
    values = torch.where(nonempty, values, values.new_zeros(()))
    return values, torch.where(nonempty, argmax, -1) if with_argmax else None


def _chunks(sizes, per_cell: int, budget: int):
    """(lo, hi, kh, kw): the rois [lo, hi) of ``sizes`` (each roi's largest bin, in the order
    pooled) read together with one kh x kw window, as many as keep
    rois x ``per_cell`` x window within ``budget`` elements (one roi at least)."""
    lo = 0
    while lo < len(sizes):
        kh, kw = sizes[lo]
        hi = lo + 1
        while hi < len(sizes):
            grow_h, grow_w = max(kh, sizes[hi][0]), max(kw, sizes[hi][1])
            if (hi + 1 - lo) * per_cell * grow_h * grow_w > budget:
                break
            kh, kw, hi = grow_h, grow_w, hi + 1
        yield lo, hi, kh, kw
        lo = hi


def _window_max(table, size, batch, hs, he, ws, we, kh: int, kw: int, with_argmax: bool):
    """The max of each bin of these rois, read as a kh x kw window from ``table`` (every
    cell's channels, row (b * H + y) * W + x, then a row of -inf the cells outside a bin
    read): (values [R, PH, PW, C], argmax h * W + w of the first maximum or None)."""
    h, w = size
    sentinel = table.shape[0] - 1
    rows = hs[:, :, None] + torch.arange(kh, device=table.device)
    cols = ws[:, :, None] + torch.arange(kw, device=table.device)
    inside_h = (rows < he[:, :, None])[:, :, None, :, None]
    inside = inside_h & (cols < we[:, :, None])[:, None, :, None, :]
    spatial = rows[:, :, None, :, None] * w + cols[:, None, :, None, :]
    cell = torch.where(inside, batch[:, None, None, None, None] * (h * w) + spatial, sentinel)
    k, ph, pw = hs.shape[0], hs.shape[1], ws.shape[1]
    window = table[cell.reshape(-1)].view(k, ph, pw, kh * kw, table.shape[1])
    if not with_argmax:
        return window.amax(dim=3), None  # several times faster than max with indices
    best, at = window.max(dim=3)  # the first maximum along the row-major window
    return best, spatial.reshape(k, ph, pw, kh * kw).gather(3, at)


class _ROIMaxPool(torch.autograd.Function):
    """Forward: the fork's max per bin. Backward: each output's gradient added at its argmax,
    except for rois whose rounded corners are out of order, which the fork's backward skips
    (its test of whether a cell lies in the roi fails for every cell): their forward still
    pools one cell, but they pass no gradient."""

    @staticmethod
    def forward(ctx, x, batch, hs, he, ws, we, ordered):
        values, argmax = roi_max_pool(x, batch, hs, he, ws, we, ctx.needs_input_grad[0])
        if argmax is not None:  # only a backward needs it
            argmax = torch.where(ordered[:, None, None, None], argmax, -1)
            ctx.save_for_backward(batch, argmax)
            ctx.data_shape = x.shape
        return values

    @staticmethod
    def backward(ctx, grad):
        batch, argmax = ctx.saved_tensors
        n, c, h, w = ctx.data_shape
        used = argmax >= 0
        cell = batch[:, None, None, None] * (h * w) + argmax.clamp(min=0)
        table = grad.new_zeros(n * h * w, c).scatter_add_(
            0, cell.reshape(-1, c), torch.where(used, grad, 0).reshape(-1, c)
        )
        return table.view(n, h, w, c).permute(0, 3, 1, 2), None, None, None, None, None, None


@register("ROIPooling")
class ROIPoolingLayer(CaffeLayer):
    """Max pooling of each region of interest into pooled_h x pooled_w bins (Fast R-CNN).

    Bottoms: features [N, C, H, W], rois [R, 5]; top [R, C, pooled_h, pooled_w]. The argmax
    the fork keeps for its backward stays inside (the fork has one top)."""

    bottoms = (2, 2)
    params = {"roi_pooling_param": frozenset({"pooled_h", "pooled_w", "spatial_scale"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.roi_pooling_param
        for field in ("pooled_h", "pooled_w"):
            if getattr(p, field) <= 0:
                raise LayerConfigError(
                    f"roi_pooling_param.{field} must be > 0, got {getattr(p, field)}"
                )
        self.pooled_h, self.pooled_w = int(p.pooled_h), int(p.pooled_w)
        self.spatial_scale = float(p.spatial_scale)

    def top_shapes(self, bottom_shapes):
        data = check_roi_shapes(bottom_shapes, "ROIPooling")
        return [(bottom_shapes[1][0], data[1], self.pooled_h, self.pooled_w)]

    def forward(self, x, rois):
        n, _, h, w = x.shape
        rows = rois.detach().reshape(-1, 5).to(_work_dtype(x))
        batch = batch_indices(self, rows, n)
        hs, he, ws, we, ordered = roi_pool_bins(
            rows, self.spatial_scale, self.pooled_h, self.pooled_w, h, w
        )
        values = _ROIMaxPool.apply(x, batch, hs, he, ws, we, ordered)
        return values.permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, pooled_h={self.pooled_h}, pooled_w={self.pooled_w}, "
            f"spatial_scale={self.spatial_scale}"
        )


# -- PSROIPooling -----------------------------------------------------------------------


def psroi_bins(rois, scale: float, group: int, height: int, width: int):
    """R-FCN's bins: corners rounded in image pixels, then scaled (the end one pixel past
    x2/y2), a roi at least 0.1 cells wide, bin b spanning [floor(start + b * size / group),
    ceil(start + (b + 1) * size / group)) as floats of the blob's Dtype, clipped to the map."""
    dtype = rois.dtype
    scale_t = torch.tensor(scale, dtype=torch.float32).to(torch.float64)
    corner = c_round(rois[:, 1:5].to(torch.float64))
    start = (corner[:, 0:2] * scale_t).to(dtype)  # x1, y1
    end = ((corner[:, 2:4] + 1.0) * scale_t).to(dtype)  # x2 + 1, y2 + 1
    size = torch.maximum(end - start, torch.tensor(0.1, dtype=torch.float32).to(dtype))
    bin_size = size / group
    b = torch.arange(group, dtype=dtype, device=rois.device)

    def axis(k, limit):
        lo = torch.floor(b[None] * bin_size[:, k, None] + start[:, k, None]).long()
        hi = torch.ceil((b[None] + 1) * bin_size[:, k, None] + start[:, k, None]).long()
        return lo.clamp(0, limit), hi.clamp(0, limit)

    ws, we = axis(0, width)
    hs, he = axis(1, height)
    return hs, he, ws, we


def psroi_average(x, batch, hs, he, ws, we, output_dim: int, group: int) -> torch.Tensor:
    """Average of each bin over its own channel (ctop * group + gh) * group + gw, by an
    integral image in float64 (exact sums; autograd then spreads each output's gradient evenly
    over its bin, as the fork's backward does). Empty bins give 0."""
    n, c, h, w = x.shape
    integral = torch.zeros(n, c, h + 1, w + 1, dtype=torch.float64, device=x.device)
    integral[:, :, 1:, 1:] = x.to(torch.float64).cumsum(2).cumsum(3)
    flat = integral.reshape(-1)
    g = torch.arange(group, device=x.device)
    ctop = torch.arange(output_dim, device=x.device)
    channel = (ctop[:, None, None] * group + g[None, :, None]) * group + g[None, None, :]
    plane = (batch[:, None, None, None] * c + channel[None]) * ((h + 1) * (w + 1))

    def at(rows, cols):  # rows [R, G] over gh, cols [R, G] over gw
        spot = rows[:, None, :, None] * (w + 1) + cols[:, None, None, :]
        return flat[plane + spot]

    total = at(he, we) - at(hs, we) - at(he, ws) + at(hs, ws)
    area = ((he - hs)[:, None, :, None] * (we - ws)[:, None, None, :]).to(torch.float64)
    empty = area <= 0
    mean = torch.where(empty, total.new_zeros(()), total / torch.where(empty, 1.0, area))
    return mean.to(x.dtype)


@register("PSROIPooling")
class PSROIPoolingLayer(CaffeLayer):
    """Position-sensitive average pooling (R-FCN): output channel ctop of bin (gh, gw) averages
    input channel (ctop * group_size + gh) * group_size + gw over that bin.

    Bottoms: score maps [N, output_dim * group_size^2, H, W], rois [R, 5]; top
    [R, output_dim, group_size, group_size]. All three fields are required, as in the fork."""

    bottoms = (2, 2)
    params = {"psroi_pooling_param": frozenset({"spatial_scale", "output_dim", "group_size"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.psroi_pooling_param
        missing = [f for f in ("spatial_scale", "output_dim", "group_size") if not p.HasField(f)]
        if missing:
            raise LayerConfigError(
                f"psroi_pooling_param.{missing[0]} is required (R-FCN's proto declares "
                "spatial_scale, output_dim and group_size `required`)"
            )
        for field in ("output_dim", "group_size"):
            if getattr(p, field) <= 0:
                raise LayerConfigError(
                    f"psroi_pooling_param.{field} must be > 0, got {getattr(p, field)}"
                )
        self.spatial_scale = float(p.spatial_scale)
        self.output_dim, self.group_size = int(p.output_dim), int(p.group_size)

    def top_shapes(self, bottom_shapes):
        data = check_roi_shapes(bottom_shapes, "PSROIPooling")
        need = self.output_dim * self.group_size**2
        if data[1] != need:
            raise LayerConfigError(
                f"input channel number does not match layer parameters: {data[1]} channels, "
                f"output_dim {self.output_dim} x group_size^2 {self.group_size**2} = {need}"
            )
        g = self.group_size
        return [(bottom_shapes[1][0], self.output_dim, g, g)]

    def forward(self, x, rois):
        n, _, h, w = x.shape
        rows = rois.detach().reshape(-1, 5).to(_work_dtype(x))
        batch = batch_indices(self, rows, n)
        hs, he, ws, we = psroi_bins(rows, self.spatial_scale, self.group_size, h, w)
        return psroi_average(x, batch, hs, he, ws, we, self.output_dim, self.group_size)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, spatial_scale={self.spatial_scale}, "
            f"output_dim={self.output_dim}, group_size={self.group_size}"
        )


# -- Proposal ---------------------------------------------------------------------------


def generate_anchors(base_size: int, ratios, scales) -> torch.Tensor:
    """py-faster-rcnn's reference anchors [A, 4] (x1, y1, x2, y2) in float64, ratios outer and
    scales inner: a base_size square at (0, 0), reshaped to each ratio keeping its area (sides
    rounded half to even, as numpy rounds), then scaled about its centre."""
    side = float(base_size)
    centre = 0.5 * (side - 1.0)
    boxes = []
    for ratio in ratios:
        w = float(round(math.sqrt(side * side / ratio)))
        h = float(round(w * ratio))
        for scale in scales:
            sw, sh = w * scale, h * scale
            boxes.append(
                [centre - 0.5 * (sw - 1), centre - 0.5 * (sh - 1),
                 centre + 0.5 * (sw - 1), centre + 0.5 * (sh - 1)]
            )  # fmt: skip
    return torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4)


def greedy_nms(boxes: torch.Tensor, threshold: float, limit: int) -> torch.Tensor:
    """Indices kept by greedy non-maximum suppression of boxes already sorted by score: a box
    goes when its overlap (pixel-inclusive areas, as py-faster-rcnn's nms) with a kept one
    exceeds ``threshold``. Stops after ``limit`` kept (0: no limit): the first ``limit`` kept
    boxes do not depend on the later ones. Runs on the host, one vector step per kept box."""
    boxes = boxes.detach().to("cpu")
    n = boxes.shape[0]
    x1, y1, x2, y2 = boxes.unbind(1)
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    suppressed = torch.zeros(n, dtype=torch.bool)
    keep: list[int] = []
    i = 0
    while i < n:
        keep.append(i)
        if 0 < limit <= len(keep):
            break
        rest = slice(i + 1, None)
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + 1).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + 1).clamp(min=0)
        inter = w * h
        suppressed[rest] |= inter / (areas[i] + areas[rest] - inter) > threshold
        left = torch.nonzero(~suppressed[rest])
        if left.numel() == 0:
            break
        i += 1 + int(left[0, 0])
    return torch.tensor(keep, dtype=torch.long)


def _clipped_boxes(anchors, d, im_h, im_w) -> torch.Tensor:
    """py-faster-rcnn's bbox_transform_inv of the deltas ``d`` (in their precision) from the
    ``anchors``, then clip_boxes to the image: (K, 4) x1, y1, x2, y2."""
    widths = anchors[:, 2] - anchors[:, 0] + 1.0
    heights = anchors[:, 3] - anchors[:, 1] + 1.0
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    px = d[:, 0] * widths + ctr_x
    py = d[:, 1] * heights + ctr_y
    pw = torch.exp(d[:, 2]) * widths
    ph = torch.exp(d[:, 3]) * heights
    zero = im_h.new_zeros(())
    x1 = torch.maximum(torch.minimum(px - 0.5 * pw, im_w - 1), zero)
    y1 = torch.maximum(torch.minimum(py - 0.5 * ph, im_h - 1), zero)
    x2 = torch.maximum(torch.minimum(px + 0.5 * pw, im_w - 1), zero)
    y2 = torch.maximum(torch.minimum(py + 0.5 * ph, im_h - 1), zero)
    return torch.stack([x1, y1, x2, y2], dim=1)


@register("Proposal")
class ProposalLayer(CaffeLayer):
    """Region proposals from a region proposal network, as py-faster-rcnn's Python layer
    (lib/rpn/proposal_layer.py) computes them, configured by OpenCV's ``proposal_param``.

    Bottoms: rpn_cls_prob_reshape [1, 2A, H, W] (background then object probabilities),
    rpn_bbox_pred [1, 4A, H, W], im_info [1, 3] (height, width, scale). Anchors: ratios x
    scales about base_size, every feat_stride pixels; each moved by its deltas, clipped to the
    image, dropped when a side is under min_size * scale, the pre_nms_topn best kept, then
    NMS at nms_thresh and the first post_nms_topn kept. Tops: rois [R, 5] (batch index 0,
    x1, y1, x2, y2) and optionally their scores [R, 1]; R is known only after NMS (the build
    reports one row, as py-faster-rcnn's layer does). No gradient flows back. Half-precision
    inputs give float32 tops: box corners in half precision would be whole pixels off."""

    bottoms = (3, 3)
    tops = (1, 2)
    params = {"proposal_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.proposal_param
        for field in ("feat_stride", "base_size"):
            if getattr(p, field) <= 0:
                raise LayerConfigError(
                    f"proposal_param.{field} must be > 0, got {getattr(p, field)}"
                )
        # py-faster-rcnn's generate_anchors defaults when the prototxt gives none
        ratios = [float(r) for r in p.ratio] or [0.5, 1.0, 2.0]
        scales = [float(s) for s in p.scale] or [8.0, 16.0, 32.0]
        bad = [r for r in ratios if not r > 0] + [s for s in scales if not s > 0]
        if bad:
            raise LayerConfigError(f"proposal_param ratio and scale must be > 0, got {bad[0]}")
        self.feat_stride, self.min_size = int(p.feat_stride), int(p.min_size)
        self.pre_nms_topn, self.post_nms_topn = int(p.pre_nms_topn), int(p.post_nms_topn)
        self.nms_thresh = float(p.nms_thresh)
        self.n_top = len(layer_param.top)
        self.register_buffer("anchors", generate_anchors(p.base_size, ratios, scales), False)

    def top_shapes(self, bottom_shapes):
        scores, deltas, info = (tuple(s) for s in bottom_shapes)
        a = self.anchors.shape[0]
        if len(scores) != 4 or len(deltas) != 4:
            raise LayerConfigError(
                f"scores and box deltas must have 4 axes, got {list(scores)} and {list(deltas)}"
            )
        if scores[0] != 1 or deltas[0] != 1:
            raise LayerConfigError(
                f"only single-image batches are supported (as in py-faster-rcnn), got "
                f"{scores[0]} images"
            )
        if scores[1] != 2 * a or deltas[1] != 4 * a:
            raise LayerConfigError(
                f"{a} anchors need {2 * a} score channels and {4 * a} box delta channels, got "
                f"{scores[1]} and {deltas[1]}"
            )
        if scores[2:] != deltas[2:]:
            raise LayerConfigError(
                f"scores {list(scores)} and box deltas {list(deltas)} differ in height or width"
            )
        if math.prod(info) < 3:
            raise LayerConfigError(
                f"im_info (bottom 2) must hold (height, width, scale), got shape {list(info)}"
            )
        return [(1, 5), (1, 1)][: self.n_top]

    def forward(self, scores, deltas, im_info):
        with torch.no_grad():
            rois, best = self._propose(scores, deltas, im_info)
        return (rois, best) if self.n_top == 2 else rois

    def _propose(self, scores, deltas, im_info):
        a = self.anchors.shape[0]
        # box arithmetic in float32 at least (py-faster-rcnn's numpy float32): pixel
        # coordinates in half precision would be off by whole pixels; the tops keep it
        dtype = _work_dtype(scores)
        scores, deltas = scores.to(dtype), deltas.to(dtype)
        _, _, h, w = scores.shape
        device = scores.device
        # (h, w, a) order, slowest to fastest, for anchors, scores and deltas alike
        anchors = self._shifted_anchors(h, w, device).to(dtype)
        fg = scores[:, a:].permute(0, 2, 3, 1).reshape(-1)
        d = deltas.permute(0, 2, 3, 1).reshape(-1, 4)
        info = im_info.reshape(-1)[:3].to(dtype)
        im_h, im_w, im_scale = info[0], info[1], info[2]
        boxes = _clipped_boxes(anchors, d, im_h, im_w)
        x1, y1, x2, y2 = boxes.unbind(1)
        least = self.min_size * im_scale
        big = ((x2 - x1 + 1) >= least) & ((y2 - y1 + 1) >= least)
        boxes, fg = boxes[big], fg[big]
        order = torch.sort(fg, descending=True, stable=True).indices
        if self.pre_nms_topn > 0:
            order = order[: self.pre_nms_topn]
        boxes, fg = boxes[order], fg[order]
        keep = greedy_nms(boxes, self.nms_thresh, self.post_nms_topn).to(device)
        boxes, fg = boxes[keep], fg[keep]
        rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        return rois, fg.reshape(-1, 1)

    def _shifted_anchors(self, h: int, w: int, device) -> torch.Tensor:
        """The anchors of every cell of an h x w map, (h * w * A, 4) float64, cell by cell."""
        shift_x = torch.arange(w, device=device, dtype=torch.float64) * self.feat_stride
        shift_y = torch.arange(h, device=device, dtype=torch.float64) * self.feat_stride
        sy, sx = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([sx, sy, sx, sy], dim=-1).reshape(-1, 1, 4)
        return (self.anchors.to(device)[None] + shifts).reshape(-1, 4)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, feat_stride={self.feat_stride}, anchors="
            f"{self.anchors.shape[0]}, min_size={self.min_size}, pre_nms_topn="
            f"{self.pre_nms_topn}, post_nms_topn={self.post_nms_topn}, "
            f"nms_thresh={self.nms_thresh}"
        )
