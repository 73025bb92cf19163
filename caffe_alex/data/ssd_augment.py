"""SSD's data augmentation (weiliu89/caffe, branch ``ssd``: util/sampler.cpp,
util/im_transforms.cpp, the annotated parts of data_transformer.cpp and the NormalizedBBox
arithmetic of bbox_util.cpp), on NumPy and OpenCV, for the AnnotatedData source (annotated.py).

Boxes are normalized (xmin, ymin, xmax, ymax) in float32, as the fork's NormalizedBBox fields.
Images are H x W x C uint8 BGR (OpenCV's layout, which the fork's cv::Mat code walks).
Random draws come from a NumPy Generator: repeatable for a seed, not Caffe's stream.
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from ..errors import LayerConfigError
from ..proto import caffe_pb2

f32 = np.float32
_Resize = caffe_pb2.ResizeParameter
_Emit = caffe_pb2.EmitConstraint

INTERPOLATIONS = {
    _Resize.LINEAR: cv2.INTER_LINEAR,
    _Resize.AREA: cv2.INTER_AREA,
    _Resize.NEAREST: cv2.INTER_NEAREST,
    _Resize.CUBIC: cv2.INTER_CUBIC,
    _Resize.LANCZOS4: cv2.INTER_LANCZOS4,
}
PADDINGS = {
    _Resize.CONSTANT: cv2.BORDER_CONSTANT,
    _Resize.MIRRORED: cv2.BORDER_REFLECT_101,
    _Resize.REPEAT_NEAREST: cv2.BORDER_REPLICATE,
}


class Boxes(NamedTuple):
    """One image's annotations, group after group in the record's order (so the label rows
    come out as the fork emits them): group label, instance id, box, difficult."""

    label: np.ndarray  # (K,) int64
    instance: np.ndarray  # (K,) int64
    box: np.ndarray  # (K, 4) float32
    difficult: np.ndarray  # (K,) bool

    @classmethod
    def empty(cls) -> Boxes:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, 4), f32),
                   np.zeros(0, bool))  # fmt: skip

    @classmethod
    def from_groups(cls, groups) -> Boxes:
        """From AnnotatedDatum.annotation_group."""
        label, instance, box, difficult = [], [], [], []
        for group in groups:
            for anno in group.annotation:
                b = anno.bbox
                label.append(group.group_label)
                instance.append(anno.instance_id)
                box.append((b.xmin, b.ymin, b.xmax, b.ymax))
                difficult.append(b.difficult)
        if not label:
            return cls.empty()
        return cls(np.array(label, np.int64), np.array(instance, np.int64),
                   np.array(box, f32).reshape(-1, 4), np.array(difficult, bool))  # fmt: skip

    def take(self, keep: np.ndarray, box: np.ndarray | None = None) -> Boxes:
        box = self.box if box is None else box
        return Boxes(self.label[keep], self.instance[keep], box[keep], self.difficult[keep])

    def rows(self) -> np.ndarray:
        """(K, 7) float32: group label, instance id, xmin, ymin, xmax, ymax, difficult (the
        label top's row without the image index)."""
        out = np.empty((len(self.label), 7), f32)
        out[:, 0], out[:, 1], out[:, 2:6] = self.label, self.instance, self.box
        out[:, 6] = self.difficult
        return out


# ---- NormalizedBBox arithmetic ------------------------------------------------------------------


def sizes(box: np.ndarray) -> np.ndarray:
    """BBoxSize (normalized): 0 for a box with xmax < xmin or ymax < ymin."""
    w, h = box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]
    return np.where((w < 0) | (h < 0), f32(0), w * h).astype(f32)


def clip(box: np.ndarray) -> np.ndarray:
    return np.clip(box, f32(0), f32(1)).astype(f32)


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IntersectBBox: the common box, (0, 0, 0, 0) where the boxes do not touch."""
    a, b = np.broadcast_arrays(a, b)
    apart = (b[..., 0] > a[..., 2]) | (b[..., 2] < a[..., 0])
    apart |= (b[..., 1] > a[..., 3]) | (b[..., 3] < a[..., 1])
    inter = np.concatenate([np.maximum(a[..., :2], b[..., :2]), np.minimum(a[..., 2:], b[..., 2:])],
                           -1)  # fmt: skip
    return np.where(apart[..., None], f32(0), inter).astype(f32)


def jaccard(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """JaccardOverlap (normalized) of ``a`` with each of ``b``."""
    inter = _intersection(a, b)
    iw, ih = inter[..., 2] - inter[..., 0], inter[..., 3] - inter[..., 1]
    inter_size = iw * ih
    union = sizes(np.broadcast_to(a, inter.shape)) + sizes(np.broadcast_to(b, inter.shape))
    union = union - inter_size
    ok = (iw > 0) & (ih > 0)
    return np.where(ok, inter_size / np.where(ok, union, f32(1)), f32(0)).astype(f32)


def coverage(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """BBoxCoverage: the share of ``a`` that ``b`` covers."""
    inter = sizes(_intersection(a, b))
    own = sizes(np.broadcast_to(a, inter.shape + (4,)))
    return np.where(inter > 0, inter / np.where(inter > 0, own, f32(1)), f32(0)).astype(f32)


def project(src: np.ndarray, box: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ProjectBBox: ``box`` in the coordinates of ``src``, clipped; and whether it is kept
    (it overlaps ``src`` and keeps an area)."""
    inside = ~((box[:, 0] >= src[2]) | (box[:, 2] <= src[0]))
    inside &= ~((box[:, 1] >= src[3]) | (box[:, 3] <= src[1]))
    w, h = src[2] - src[0], src[3] - src[1]
    proj = np.stack([(box[:, 0] - src[0]) / w, (box[:, 1] - src[1]) / h,
                     (box[:, 2] - src[0]) / w, (box[:, 3] - src[1]) / h], -1)  # fmt: skip
    proj = clip(proj.astype(f32))
    return proj, inside & (sizes(proj) > 0)


def meets_emit_constraint(src: np.ndarray, box: np.ndarray, emit) -> np.ndarray:
    """MeetEmitConstraint: CENTER: the box's centre lies in ``src``; MIN_OVERLAP: ``src``
    covers more than emit_overlap of the box."""
    if emit.emit_type == _Emit.CENTER:
        cx, cy = (box[:, 0] + box[:, 2]) / f32(2), (box[:, 1] + box[:, 3]) / f32(2)
        return (cx >= src[0]) & (cx <= src[2]) & (cy >= src[1]) & (cy <= src[3])
    return coverage(box, src) > f32(emit.emit_overlap)


def resized_boxes(param, old_width: int, old_height: int, box: np.ndarray) -> np.ndarray:
    """UpdateBBoxByResizePolicy (WARP, FIT_LARGE_SIZE_AND_PAD): boxes in the resized image,
    in the fork's float32 order of operations."""
    new_h, new_w = f32(param.height), f32(param.width)
    ow, oh = f32(old_width), f32(old_height)
    x0, y0, x1, y1 = (box[:, k] * (ow if k % 2 == 0 else oh) for k in range(4))

    def warp_x(a, b):
        return np.maximum(f32(0), a * new_w / ow), np.minimum(new_w, b * new_w / ow)

    def warp_y(a, b):
        return np.maximum(f32(0), a * new_h / oh), np.minimum(new_h, b * new_h / oh)

    if param.resize_mode == _Resize.WARP:
        (x0, x1), (y0, y1) = warp_x(x0, x1), warp_y(y0, y1)
    else:  # FIT_LARGE_SIZE_AND_PAD: the image keeps its aspect, centred between bands
        orig_aspect, new_aspect = ow / oh, new_w / new_h
        if orig_aspect > new_aspect:
            pad = (new_h - new_w / orig_aspect) / f32(2)
            x0, x1 = warp_x(x0, x1)
            y0 = pad + np.maximum(f32(0), y0 * (new_h - f32(2) * pad) / oh)
            y1 = pad + np.minimum(new_h, y1 * (new_h - f32(2) * pad) / oh)
        else:
            pad = (new_w - orig_aspect * new_h) / f32(2)
            x0 = pad + np.maximum(f32(0), x0 * (new_w - f32(2) * pad) / ow)
            x1 = pad + np.minimum(new_w, x1 * (new_w - f32(2) * pad) / ow)
            y0, y1 = warp_y(y0, y1)
    return np.stack([x0 / new_w, y0 / new_h, x1 / new_w, y1 / new_h], -1).astype(f32)


def transform_boxes(boxes: Boxes, crop: np.ndarray, emit=None, mirror=False,
                    resize=None) -> Boxes:  # fmt: skip
    """TransformAnnotation: each box (resized first where ``resize`` = (param, width, height)
    is given) that meets the emit constraint and overlaps ``crop`` is projected into it and,
    with ``mirror``, flipped left to right; the rest are dropped."""
    box = boxes.box
    if resize is not None:
        box = resized_boxes(resize[0], resize[1], resize[2], box)
    keep = np.ones(len(box), bool)
    if emit is not None:
        keep &= meets_emit_constraint(crop, box, emit)
    proj, ok = project(crop, box)
    keep &= ok
    if mirror:
        proj = np.stack([f32(1) - proj[:, 2], proj[:, 1], f32(1) - proj[:, 0], proj[:, 3]], -1)
    return boxes.take(keep, proj.astype(f32))


# ---- batch samplers (sampler.cpp) ---------------------------------------------------------------


def check_sampler(batch_sampler, where: str) -> None:
    """The fork's CHECKs on a sampler, as a one-line error."""
    s = batch_sampler.sampler
    problems = [
        (s.max_scale < s.min_scale, "max_scale must be >= min_scale"),
        (s.min_scale <= 0, "min_scale must be > 0"),
        (s.max_scale > 1, "max_scale must be <= 1"),
        (s.max_aspect_ratio < s.min_aspect_ratio, "max_aspect_ratio must be >= min_aspect_ratio"),
        (s.min_aspect_ratio <= 0, "min_aspect_ratio must be > 0"),
    ]
    for bad, message in problems:
        if bad:
            raise LayerConfigError(f"{where}.sampler: {message}")


def sample_box(sampler, rng: np.random.Generator) -> np.ndarray:
    """SampleBBox: a box of random scale and aspect ratio (kept inside the unit square)."""
    scale = f32(rng.uniform(sampler.min_scale, sampler.max_scale))
    ratio = f32(rng.uniform(sampler.min_aspect_ratio, sampler.max_aspect_ratio))
    ratio = min(max(ratio, f32(scale**2)), f32(1 / scale**2))
    w, h = f32(scale * np.sqrt(ratio)), f32(scale / np.sqrt(ratio))
    # a side may round a hair above 1: the offset range is then empty, not negative
    x, y = f32(rng.uniform(0, max(0, 1 - w))), f32(rng.uniform(0, max(0, 1 - h)))
    return np.array([x, y, x + w, y + h], f32)


def satisfies(sample: np.ndarray, objects: np.ndarray, constraint) -> bool:
    """SatisfySampleConstraint: true without constraints; else whether some object meets the
    bounds of the first kind given, in the order Jaccard overlap, share of the sample the
    object covers, share of the object the sample covers. (The fork means every kind to
    count, but its loop keeps ``found`` once the first kind passed for any object, so the
    later kinds never change the answer; that is what it does, and what this does.)"""
    has = constraint.HasField
    for low, high, values in (
        ("min_jaccard_overlap", "max_jaccard_overlap", lambda: jaccard(sample, objects)),
        ("min_sample_coverage", "max_sample_coverage", lambda: coverage(sample, objects)),
        ("min_object_coverage", "max_object_coverage", lambda: coverage(objects, sample)),
    ):
        if has(low) or has(high):
            v = values()
            ok = np.ones(len(objects), bool)
            if has(low):
                ok &= v >= f32(getattr(constraint, low))
            if has(high):
                ok &= v <= f32(getattr(constraint, high))
            return bool(ok.any())
    return True


def generate_samples(objects: np.ndarray, batch_samplers, rng) -> list[np.ndarray]:
    """GenerateBatchSamples: for each batch_sampler with use_original_image, up to
    max_trials draws, keeping those that satisfy its constraint, at most max_sample."""
    found_all = []
    for bs in batch_samplers:
        if not bs.use_original_image:
            continue
        found = 0
        for _ in range(bs.max_trials):
            if bs.HasField("max_sample") and found >= bs.max_sample:
                break
            sample = sample_box(bs.sampler, rng)
            if satisfies(sample, objects, bs.sample_constraint):
                found += 1
                found_all.append(sample)
    return found_all


# ---- image operations -------------------------------------------------------------------------


def crop_image(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """CropImage's pixels: the clipped box scaled to pixels, corners truncated to ints."""
    h, w = image.shape[:2]
    scaled = clip(box) * np.array([w, h, w, h], f32)
    x0, y0 = int(scaled[0]), int(scaled[1])
    width, height = int(scaled[2] - scaled[0]), int(scaled[3] - scaled[1])
    return image[y0 : y0 + height, x0 : x0 + width]


def expand_canvas(image: np.ndarray, ratio: float, fill, rng) -> tuple[np.ndarray, np.ndarray]:
    """ExpandImage: the image placed at a random whole-pixel offset in a canvas ``ratio``
    times its size filled with ``fill`` (per channel); returns the canvas and where the
    canvas lies in the image's normalized coordinates."""
    h, w, c = image.shape
    big_h, big_w = int(h * f32(ratio)), int(w * f32(ratio))
    y = float(np.floor(f32(rng.uniform(0, big_h - h))))
    x = float(np.floor(f32(rng.uniform(0, big_w - w))))
    canvas = np.empty((big_h, big_w, c), np.uint8)
    canvas[...] = np.asarray(fill, np.uint8)
    canvas[int(y) : int(y) + h, int(x) : int(x) + w] = image
    where = np.array([-x / w, -y / h, (big_w - x) / w, (big_h - y) / h], f32)
    return canvas, where


def resize_image(image: np.ndarray, param, rng) -> np.ndarray:
    """ApplyResize (WARP or FIT_LARGE_SIZE_AND_PAD) with an interpolation drawn uniformly
    from interp_mode (LINEAR when none is listed)."""
    modes = list(param.interp_mode) or [_Resize.LINEAR]
    interp = INTERPOLATIONS[modes[int(rng.integers(len(modes))) if len(modes) > 1 else 0]]
    new_h, new_w = int(param.height), int(param.width)
    if param.resize_mode == _Resize.WARP:
        out = cv2.resize(image, (new_w, new_h), interpolation=interp)
        return out.reshape(new_h, new_w, image.shape[2])
    h, w, c = image.shape
    pad_value = list(param.pad_value) or [0.0]
    if len(pad_value) == 1:
        pad_value = pad_value * c
    aspect, new_aspect = f32(w) / f32(h), f32(new_w) / f32(new_h)
    if aspect > new_aspect:
        height = int(np.floor(f32(new_w) / aspect))
        out = cv2.resize(image, (new_w, height), interpolation=interp).reshape(height, new_w, c)
        top = int(np.floor((new_h - height) / 2.0))
        border = (top, new_h - height - top, 0, 0)
    else:
        width = int(np.floor(aspect * f32(new_h)))
        out = cv2.resize(image, (width, new_h), interpolation=interp).reshape(new_h, width, c)
        left = int(np.floor((new_w - width) / 2.0))
        border = (0, 0, left, new_w - width - left)
    out = cv2.copyMakeBorder(out, *border, PADDINGS[param.pad_mode], value=pad_value[:4])
    return out.reshape(new_h, new_w, c)


def _convert(plane: np.ndarray, alpha, beta) -> np.ndarray:
    """cv::Mat::convertTo to 8 bits: alpha * x + beta in float, rounded, saturated."""
    value = plane.astype(f32) * f32(alpha) + f32(beta)
    return np.clip(np.rint(value), 0, 255).astype(np.uint8)


def _hsv_channel(image: np.ndarray, channel: int, alpha, beta) -> np.ndarray:
    hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
    hsv[..., channel] = _convert(hsv[..., channel], alpha, beta)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)


def _brightness(img, p, rng):
    if rng.random() < p.brightness_prob:
        delta = rng.uniform(-p.brightness_delta, p.brightness_delta)
        if abs(delta) > 0:
            return _convert(img, 1, delta)
    return img


def _contrast(img, p, rng):
    if rng.random() < p.contrast_prob:
        delta = rng.uniform(p.contrast_lower, p.contrast_upper)
        if abs(delta - 1) > 1e-3:
            return _convert(img, delta, 0)
    return img


def _saturation(img, p, rng):
    if rng.random() < p.saturation_prob:
        # the fork adjusts whatever the factor (its test compares with != 1e-3)
        return _hsv_channel(img, 1, rng.uniform(p.saturation_lower, p.saturation_upper), 0)
    return img


def _hue(img, p, rng):
    if rng.random() < p.hue_prob:
        delta = rng.uniform(-p.hue_delta, p.hue_delta)
        if abs(delta) > 0:
            return _hsv_channel(img, 0, 1, delta)
    return img


def _channel_order(img, p, rng):
    if rng.random() < p.random_order_prob:
        return np.ascontiguousarray(img[..., rng.permutation(img.shape[2])])
    return img


def distort_image(image: np.ndarray, p, rng) -> np.ndarray:
    """ApplyDistort: random brightness, contrast, saturation and hue (contrast first or
    fourth, by a coin), then a random channel order, each with its probability."""
    steps = [_brightness, _contrast, _saturation, _hue] if rng.random() > 0.5 else [
        _brightness, _saturation, _hue, _contrast]  # fmt: skip
    for step in [*steps, _channel_order]:
        image = step(image, p, rng)
    return image


def check_distortion(p, where: str) -> None:
    """The fork's CHECKs on distort_param (it makes them when a draw first uses them)."""
    problems = [
        (p.brightness_prob > 0 and p.brightness_delta < 0, "brightness_delta must be >= 0"),
        (p.hue_prob > 0 and p.hue_delta < 0, "hue_delta must be >= 0"),
        (p.contrast_prob > 0 and p.contrast_upper < p.contrast_lower,
         "contrast_upper must be >= contrast_lower"),
        (p.contrast_prob > 0 and p.contrast_lower < 0, "contrast_lower must be >= 0"),
        (p.saturation_prob > 0 and p.saturation_upper < p.saturation_lower,
         "saturation_upper must be >= saturation_lower"),
        (p.saturation_prob > 0 and p.saturation_lower < 0, "saturation_lower must be >= 0"),
    ]  # fmt: skip
    for bad, message in problems:
        if bad:
            raise LayerConfigError(f"{where}: {message}")
