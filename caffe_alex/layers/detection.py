"""SSD's detection layers (weiliu89/caffe, branch ``ssd``): PriorBox and DetectionOutput.

PriorBox honours ``prior_box_param``: ``min_size``, ``max_size``, ``aspect_ratio``, ``flip``,
``clip``, ``variance``, ``img_size`` / ``img_h`` / ``img_w``, ``step`` / ``step_h`` /
``step_w``, ``offset`` (OpenCV's ``width``, ``height``, ``offset_h``, ``offset_w`` are refused).
Its top, [1, 2, H * W * num_priors * 4], holds the boxes of every cell (row-major over the
feature map) in channel 0 and their variances in channel 1; it depends on shapes only.

DetectionOutput honours ``detection_output_param``: ``num_classes``, ``share_location``,
``background_label_id``, ``nms_param`` (``nms_threshold``, ``top_k``, ``eta``), ``code_type``,
``keep_top_k``, ``variance_encoded_in_target``, ``confidence_threshold``; ``save_output_param``
(SSD's result files for its evaluation scripts) is accepted and not written, ``visualize`` is
refused. Bottoms: loc, conf, priors and an optional image SSD reads only to draw boxes. The top,
[1, 1, kept, 7], holds one row (image, label, score, xmin, ymin, xmax, ymax) per kept box,
image by image, labels ascending, scores descending within a label; with nothing kept in the
whole batch, one row (image, -1, ..., -1) per image. The number of rows is known only once the
data arrives, so ``Net.blob_shapes`` holds an upper bound for it (as for Filter). SSD has no
backward for it: asking for one raises.

Where the fork's CPU and GPU code differ, we follow the CPU code (stable sort of equal scores,
zero overlap for degenerate boxes), except for share_location with background_label_id -1,
where the CPU code aborts and the GPU code (which SSD models run on) decodes the shared boxes.
"""

from __future__ import annotations

import math
import struct

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..log import get_logger
from ..proto import caffe_pb2
from ..registry import CaffeLayer, compiling, register
from . import bbox

_CODE = caffe_pb2.PriorBoxParameter
_FLT_MAX = 3.4028234663852886e38


def f32(value: float) -> float:
    """``value`` rounded to float32, as the fork's float variables hold it."""
    return struct.unpack("f", struct.pack("f", value))[0]


def legacy_dim(shape, index: int, what: str) -> int:
    """Caffe's num()/channels()/height()/width(): 1 past the last axis; more than 4 axes fail."""
    if len(shape) > 4:
        raise LayerConfigError(f"{what} must have at most 4 axes, got {list(shape)}")
    return int(shape[index]) if index < len(shape) else 1


def _check_box_sizes(p) -> None:
    """prior_box_param's min_size (one at least, each positive) and max_size (none, or one
    larger per min_size)."""
    if not p.min_size:
        raise LayerConfigError("prior_box_param.min_size is required (none given)")
    for value in p.min_size:
        if not value > 0:
            raise LayerConfigError(f"prior_box_param.min_size {value:g} must be positive")
    if p.max_size and len(p.max_size) != len(p.min_size):
        raise LayerConfigError(
            f"prior_box_param has {len(p.max_size)} max_size for {len(p.min_size)} min_size: "
            "give one per min_size or none"
        )
    for low, high in zip(p.min_size, p.max_size):
        if not high > low:
            raise LayerConfigError(
                f"prior_box_param.max_size {high:g} must be greater than min_size {low:g}"
            )


def _aspect_ratios(p) -> list[float]:
    """1, then each new aspect_ratio (and its inverse in float32 with flip)."""
    ratios = [1.0]
    for ar in p.aspect_ratio:
        if all(abs(ar - r) >= 1e-6 for r in ratios):
            ratios.append(ar)
            if p.flip:
                ratios.append(f32(1.0 / ar))
    return ratios


def _variances(p) -> list[float]:
    """prior_box_param.variance: 1 or 4 positive values, 0.1 where none is given."""
    if len(p.variance) not in (0, 1, 4):
        raise LayerConfigError(
            f"prior_box_param.variance has {len(p.variance)} values: give 1 or 4"
        )
    for value in p.variance:
        if not value > 0:
            raise LayerConfigError(f"prior_box_param.variance {value:g} must be positive")
    return list(p.variance) or [f32(0.1)]


def _prior_sizes(p, ratios) -> list[tuple[float, float]]:
    """(width, height) of each prior of a cell, as the fork's float arithmetic gives them."""
    sizes = []
    for s, low in enumerate(p.min_size):
        low = int(low)
        sizes.append((float(low), float(low)))
        if p.max_size:
            side = f32(math.sqrt(low * int(p.max_size[s])))
            sizes.append((side, side))
        for ar in ratios:
            if abs(ar - 1.0) >= 1e-6:
                root = f32(math.sqrt(ar))
                sizes.append((f32(low * root), f32(low / root)))
    return sizes


@register("PriorBox")
class PriorBoxLayer(CaffeLayer):
    """Default boxes of one feature map (bottom 0) for an image (bottom 1, read for its size
    unless img_size / img_h / img_w give it). Per cell and per min_size: the min_size square,
    the sqrt(min_size * max_size) square, then each aspect ratio but 1. The fork truncates
    min_size and max_size to integers here, so 35.84 acts as 35."""

    bottoms = (2, 2)
    params = {
        "prior_box_param": frozenset(
            "min_size max_size aspect_ratio flip clip variance img_size img_h img_w step step_h "
            "step_w offset".split()
        )
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.prior_box_param
        _check_box_sizes(p)
        ratios = _aspect_ratios(p)
        self.variance = _variances(p)
        self.img_h, self.img_w = self._pair(p, "img_size", "img_h", "img_w")
        self.step_h, self.step_w = self._pair(p, "step", "step_h", "step_w")
        self.offset, self.clip = p.offset, p.clip
        self.sizes = _prior_sizes(p, ratios)

    @staticmethod
    def _pair(p, both: str, first: str, second: str) -> tuple[float, float]:
        if p.HasField(first) or p.HasField(second):
            if p.HasField(both):
                raise LayerConfigError(
                    f"prior_box_param: give either {both} or {first}/{second}, not both"
                )
            for name in (first, second):
                if not getattr(p, name) > 0:
                    raise LayerConfigError(
                        f"prior_box_param.{name} must be positive when {first}/{second} are "
                        f"given, got {getattr(p, name):g}"
                    )
            return getattr(p, first), getattr(p, second)
        if p.HasField(both):
            if not getattr(p, both) > 0:
                raise LayerConfigError(f"prior_box_param.{both} must be positive")
            return getattr(p, both), getattr(p, both)
        return 0, 0

    def top_shapes(self, bottom_shapes):
        h = legacy_dim(bottom_shapes[0], 2, "bottom 0")
        w = legacy_dim(bottom_shapes[0], 3, "bottom 0")
        if self.img_h == 0 or self.img_w == 0:  # the image is read for its size
            legacy_dim(bottom_shapes[1], 3, "bottom 1")
        size = h * w * len(self.sizes) * 4
        if size <= 0:
            raise LayerConfigError(f"bottom 0 {list(bottom_shapes[0])} has no cell to put a prior")
        return [(1, 2, size)]

    def forward(self, feature, image):
        h, w = (legacy_dim(feature.shape, i, "bottom 0") for i in (2, 3))
        img_h, img_w = self.img_h, self.img_w
        if img_h == 0 or img_w == 0:
            img_h, img_w = (legacy_dim(image.shape, i, "bottom 1") for i in (2, 3))
        step_h, step_w = self.step_h, self.step_w
        if step_h == 0 or step_w == 0:
            step_h, step_w = f32(img_h / h), f32(img_w / w)
        dev = feature.device
        # centres in float32 as the fork computes them, the corners in double
        one = torch.tensor([self.offset], dtype=torch.float32, device=dev)
        cx = ((torch.arange(w, dtype=torch.float32, device=dev) + one) * step_w).double()
        cy = ((torch.arange(h, dtype=torch.float32, device=dev) + one) * step_h).double()
        half = torch.tensor(self.sizes, dtype=torch.float32, device=dev).double() / 2
        cx, cy = cx.view(1, w, 1), cy.view(h, 1, 1)
        hw, hh = half[:, 0].view(1, 1, -1), half[:, 1].view(1, 1, -1)
        corners = ((cx - hw) / img_w, (cy - hh) / img_h, (cx + hw) / img_w, (cy + hh) / img_h)
        boxes = torch.stack(torch.broadcast_tensors(*corners), dim=-1).reshape(-1)
        boxes = boxes.to(feature.dtype)
        if self.clip:
            boxes = boxes.clamp(0, 1)
        variance = torch.tensor(self.variance, dtype=feature.dtype, device=dev)
        variance = variance.repeat(boxes.numel() // len(self.variance))
        return torch.stack((boxes, variance)).unsqueeze(0)


class _NoBackward(torch.autograd.Function):
    """The detections, with SSD's NOT_IMPLEMENTED backward: raising is what Caffe's abort
    becomes when a gradient is asked through this layer."""

    @staticmethod
    def forward(ctx, layer, loc, conf, prior):
        ctx.name = layer.name
        return layer.detect(loc, conf, prior)

    @staticmethod
    def backward(ctx, dy):
        raise CaffeAlexError(
            "SSD has no backward for DetectionOutput (NOT_IMPLEMENTED); stop the gradient "
            "below this layer (propagate_down: false on its bottoms)",
            layer=ctx.name,
            layer_type="DetectionOutput",
        )


def nms_fast(boxes, sizes, scores, score_threshold, nms_threshold, eta, top_k) -> torch.Tensor:
    """ApplyNMSFast: the indices above ``score_threshold``, by score descending (ties in index
    order) and cut to ``top_k``, kept greedily while their Jaccard overlap with every box kept
    before is <= the threshold, which each kept box multiplies by ``eta`` while it is > 0.5."""
    order = torch.nonzero(scores > score_threshold).reshape(-1)
    order = order[torch.sort(scores[order], descending=True, stable=True).indices]
    if top_k > -1:
        order = order[:top_k]
    b, s = boxes[order], sizes[order]
    if eta >= 1 and 0 < len(order) <= _PAIRWISE_LIMIT:
        return order[_kept_at_fixed_threshold(b, s, nms_threshold)]
    worst = torch.zeros(len(order), dtype=boxes.dtype)  # largest overlap with a kept box
    kept, start, threshold = [], 0, nms_threshold
    while start < len(order):
        free = torch.nonzero(worst[start:] <= threshold)  # NaN overlaps never pass
        if len(free) == 0:
            break
        j = start + int(free[0, 0])
        kept.append(j)
        rest = b[j + 1 :]
        iw = torch.minimum(rest[:, 2], b[j, 2]) - torch.maximum(rest[:, 0], b[j, 0])
        ih = torch.minimum(rest[:, 3], b[j, 3]) - torch.maximum(rest[:, 1], b[j, 1])
        inter = iw * ih
        overlap = torch.where((iw > 0) & (ih > 0), inter / (s[j + 1 :] + s[j] - inter), 0)
        worst[j + 1 :] = torch.maximum(worst[j + 1 :], overlap)
        if eta < 1 and threshold > 0.5:
            threshold = f32(threshold * eta)
        start = j + 1
    return order[torch.tensor(kept, dtype=torch.long)]


# Candidates up to which nms_fast computes every pairwise overlap at once (a 16 MiB matrix).
_PAIRWISE_LIMIT = 2048


def _kept_at_fixed_threshold(b, s, threshold) -> torch.Tensor:
    """nms_fast's greedy pass when the threshold never changes (eta 1), from all pairwise
    overlaps at once instead of one kept box at a time (the same float32 operations, so the
    same overlaps): box j is kept iff no kept box before it overlaps it by more than the
    threshold (NaN counts as more). Each box depends only on earlier ones, so that rule has
    one solution; applying it repeatedly from "all kept" reaches it within len(b) rounds,
    usually a few."""
    iw = torch.minimum(b[None, :, 2], b[:, None, 2]) - torch.maximum(b[None, :, 0], b[:, None, 0])
    ih = torch.minimum(b[None, :, 3], b[:, None, 3]) - torch.maximum(b[None, :, 1], b[:, None, 1])
    inter = iw * ih
    overlap = torch.where((iw > 0) & (ih > 0), inter / (s[None, :] + s[:, None] - inter), 0)
    # row i, column j: kept box i rules out box j (only an earlier box can)
    rules_out = torch.triu(~(overlap <= threshold), diagonal=1)
    kept = torch.ones(len(b), dtype=torch.bool)
    for _ in range(len(b)):
        now = ~(rules_out & kept[:, None]).any(dim=0)
        if torch.equal(now, kept):
            break
        kept = now
    return torch.nonzero(kept).reshape(-1)


@register("DetectionOutput")
class DetectionOutputLayer(CaffeLayer):
    """Decodes the loc predictions against the priors, runs per-class NMS on the scores and
    keeps the best ``keep_top_k`` per image (see the module docstring for the output)."""

    bottoms = (3, 4)
    params = {
        "detection_output_param": frozenset(
            "num_classes share_location background_label_id nms_param save_output_param "
            "code_type keep_top_k variance_encoded_in_target confidence_threshold visualize "
            "visualize_threshold save_file".split()
        )
    }
    output_needed_by_backward = False

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.detection_output_param
        if not p.HasField("num_classes"):
            raise LayerConfigError("detection_output_param.num_classes is required")
        if p.visualize:
            raise LayerConfigError(
                "detection_output_param.visualize: true is not supported (SSD draws the "
                "detections in an OpenCV window)"
            )
        nms = p.nms_param
        if not nms.nms_threshold >= 0:
            raise LayerConfigError(
                f"detection_output_param.nms_param.nms_threshold {nms.nms_threshold:g} must be >= 0"
            )
        if not 0 < nms.eta <= 1:
            raise LayerConfigError(
                f"detection_output_param.nms_param.eta {nms.eta:g} must be in (0, 1]"
            )
        if p.code_type not in (_CODE.CORNER, _CODE.CENTER_SIZE, _CODE.CORNER_SIZE):
            raise LayerConfigError(f"detection_output_param.code_type {p.code_type} is unknown")
        save = p.save_output_param
        if save.output_directory and save.label_map_file and save.name_size_file:
            get_logger().warning(
                "layer '%s': detection_output_param.save_output_param is ignored: the result "
                "files for SSD's evaluation scripts are not written (the top is unchanged)",
                self.name,
            )
        self.num_classes = int(p.num_classes)
        self.share_location = p.share_location
        self.loc_classes = 1 if p.share_location else self.num_classes
        self.background = p.background_label_id
        self.code_type, self.encoded = p.code_type, p.variance_encoded_in_target
        self.keep_top_k = p.keep_top_k
        self.confidence = p.confidence_threshold if p.HasField("confidence_threshold") else None
        self.nms_threshold, self.eta = nms.nms_threshold, nms.eta
        self.top_k = nms.top_k if nms.HasField("top_k") else -1

    def top_shapes(self, bottom_shapes):
        loc, conf, prior = (tuple(s) for s in bottom_shapes[:3])
        num = legacy_dim(loc, 0, "bottom 0 (loc)")
        if num != legacy_dim(conf, 0, "bottom 1 (conf)"):
            raise LayerConfigError(f"loc {list(loc)} and conf {list(conf)} differ in number")
        priors = legacy_dim(prior, 2, "bottom 2 (priors)") // 4
        want = priors * self.loc_classes * 4
        if legacy_dim(loc, 1, "bottom 0 (loc)") != want:
            raise LayerConfigError(
                f"loc {list(loc)} must have {want} channels: {priors} priors x "
                f"{self.loc_classes} location classes x 4"
            )
        want = priors * self.num_classes
        if legacy_dim(conf, 1, "bottom 1 (conf)") != want:
            raise LayerConfigError(
                f"conf {list(conf)} must have {want} channels: {priors} priors x "
                f"{self.num_classes} classes"
            )
        # an upper bound of the rows forward keeps (see the module docstring)
        classes = self.num_classes - (0 <= self.background < self.num_classes)
        per_image = classes * (min(self.top_k, priors) if self.top_k > -1 else priors)
        if self.keep_top_k > -1:
            per_image = min(per_image, self.keep_top_k)
        return [(1, 1, max(num * per_image, num), 7)]

    def forward(self, loc, conf, prior, image=None):
        if compiling():
            return self.detect(loc, conf, prior)
        return _NoBackward.apply(self, loc, conf, prior)

    def detect(self, loc, conf, prior) -> torch.Tensor:
        num = loc.shape[0]
        boxes, scores = self._host_inputs(loc, conf, prior)
        rows = [self._image_rows(i, boxes[i], scores[i]) for i in range(num)]
        rows = [r for r in rows if r is not None]
        work = boxes.dtype
        out = torch.cat(rows) if rows else torch.empty(0, 7, dtype=work)
        if len(out) == 0:  # the fork's placeholder: one row per image, -1 but the image index
            out = torch.full((num, 7), -1, dtype=work)
            out[:, 0] = torch.arange(num, dtype=work)
        return out.to(loc.device, loc.dtype).view(1, 1, -1, 7)

    def _host_inputs(self, loc, conf, prior):
        """The decoded boxes [num, loc classes, priors, 4] and the scores [num, priors,
        classes], on the host, float64 for double nets and float32 otherwise."""
        num, priors = loc.shape[0], legacy_dim(prior.shape, 2, "bottom 2 (priors)") // 4
        work = torch.float64 if loc.dtype == torch.float64 else torch.float32

        def host(t, size):  # the fork reads its bottoms as flat arrays
            return t.detach().reshape(-1)[:size].to("cpu", work)

        loc_h = host(loc, num * priors * self.loc_classes * 4).view(num, priors, -1, 4)
        conf_h = host(conf, num * priors * self.num_classes).view(num, priors, -1)
        prior_h = host(prior, 2 * priors * 4).view(2, priors, 4)
        boxes = bbox.decode(
            prior_h[0], prior_h[1], loc_h.transpose(1, 2), self.code_type, self.encoded
        ).to(work)
        return boxes, conf_h

    def _image_rows(self, i: int, boxes, scores):
        """Image ``i``'s detections as top rows, or None where NMS keeps none."""
        kept = self._nms_per_class(boxes, scores)
        if kept is None:
            return None
        label, pick = kept
        score = scores[pick, label]
        if -1 < self.keep_top_k < len(pick):
            best = torch.sort(score, descending=True, stable=True).indices[: self.keep_top_k]
            best = best[torch.sort(label[best], stable=True).indices]
            label, pick, score = label[best], pick[best], score[best]
        box = boxes[0 if self.share_location else label, pick]
        image = torch.full_like(score, i)
        return torch.cat((image[:, None], label[:, None].to(boxes.dtype), score[:, None], box), 1)

    def _nms_per_class(self, boxes, scores):
        """(label, prior) of each box NMS keeps, class by class but the background; None
        where every class is the background."""
        threshold = -_FLT_MAX if self.confidence is None else self.confidence
        sizes = [bbox.box_sizes(b) for b in boxes]
        labels, picks = [], []
        for c in range(self.num_classes):
            if c == self.background:
                continue
            k = 0 if self.share_location else c
            kept = nms_fast(
                boxes[k], sizes[k], scores[:, c], threshold,
                self.nms_threshold, self.eta, self.top_k,
            )  # fmt: skip
            labels.append(torch.full_like(kept, c))
            picks.append(kept)
        if not picks:
            return None
        return torch.cat(labels), torch.cat(picks)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_classes={self.num_classes}, "
            f"nms_threshold={self.nms_threshold:g}, top_k={self.top_k}, "
            f"keep_top_k={self.keep_top_k}"
        )
