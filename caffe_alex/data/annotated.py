"""SSD's AnnotatedData input (weiliu89/caffe, branch ``ssd``): AnnotatedDatum records from an
LMDB or LevelDB, augmented and transformed with their boxes as the fork's
AnnotatedDataLayer::load_batch and DataTransformer do it.

Per record, in the fork's order: distort_param (encoded records only, as in the fork), then
expand_param (zoom out onto a canvas of the mean colour), then the batch samplers (a random
crop among the boxes that meet a sampler's constraint), then the transform proper: mirror coin,
resize_param (WARP or FIT_LARGE_SIZE_AND_PAD, interpolation drawn from interp_mode), crop
(crop_size, or crop_h and crop_w), mean and scale. Each step moves the boxes with the pixels
(TransformAnnotation: resized, kept where they meet emit_constraint and overlap the crop,
projected into it, flipped with the mirror).

``sample(position, rng)`` gives the (C, H, W) float32 image and, for a BBOX record, its box rows
(K, 7): group label, instance id, xmin, ymin, xmax, ymax, difficult; the feed stacks the rows of
a batch into the label top (1, 1, rows, 8) with the image's index first, as the fork does, or a
single row of -1 for a batch without a box.

Differences from the fork: it re-encodes an encoded record as JPEG after each of the distort,
expand and crop steps (a lossy round trip); here the decoded pixels go from step to step. Its
random stream is not reproduced: draws come from a NumPy generator, repeatable for a seed.
"""

from __future__ import annotations

import numpy as np

from ..errors import CaffeAlexError, LayerConfigError, describe
from ..log import get_logger
from ..proto import caffe_pb2
from .datum import ImageError, color_flag, datum_to_array, decode_image
from .sources import DataError, Source, open_records
from .ssd_augment import (
    Boxes,
    check_distortion,
    check_sampler,
    clip,
    crop_image,
    distort_image,
    expand_canvas,
    generate_samples,
    resize_image,
    transform_boxes,
)
from .transformer import channel_means, load_mean_file

f32 = np.float32
_Resize = caffe_pb2.ResizeParameter
BBOX = caffe_pb2.AnnotatedDatum.BBOX
_RAW_EXPAND_FILL = 32  # the fork fills a raw record's canvas with ' ' bytes


def parse_annotated(value: bytes, where: str) -> caffe_pb2.AnnotatedDatum:
    """Parse an AnnotatedDatum; ``where`` names the record in the error."""
    record = caffe_pb2.AnnotatedDatum()
    try:
        record.ParseFromString(value)
    except Exception as exc:  # protobuf's DecodeError
        raise CaffeAlexError(f"{where} is not an AnnotatedDatum: {describe(exc)}") from None
    return record


def _resize_param(t):
    """transform_param.resize_param, checked, or None."""
    if not t.HasField("resize_param"):
        return None
    r = t.resize_param
    if r.resize_mode == _Resize.FIT_SMALL_SIZE:
        raise LayerConfigError(
            "resize_param.resize_mode FIT_SMALL_SIZE is not supported (its images keep "
            "their aspect, so the data shape changes from batch to batch); use WARP or "
            "FIT_LARGE_SIZE_AND_PAD"
        )
    if r.height <= 0 or r.width <= 0:
        raise LayerConfigError("resize_param.height and width must be > 0")
    return r


def _expand_param(t, mean):
    """transform_param.expand_param, checked against the ``mean`` file, or None."""
    if not t.HasField("expand_param"):
        return None
    if t.expand_param.max_expand_ratio <= 1:
        raise LayerConfigError("expand_param.max_expand_ratio must be > 1")
    if mean is not None:
        raise LayerConfigError(
            "expand_param with mean_file is not supported (the fork fills the canvas "
            "from the mean only when it has the expanded image's size); use mean_value"
        )
    return t.expand_param


class AnnotatedTransformer:
    """transform_param (scale, mirror, crop_size, crop_h, crop_w, mean_file, mean_value,
    force_color, force_gray, resize_param, distort_param, expand_param, emit_constraint) and
    annotated_data_param.batch_sampler for one layer. Configuration errors are
    LayerConfigErrors, problems with a record CaffeAlexErrors."""

    def __init__(self, lp, phase: str):
        t, a = lp.transform_param, lp.annotated_data_param
        self.phase = phase.upper()
        if t.HasField("mean_file") and len(t.mean_value):
            raise LayerConfigError("cannot specify mean_file and mean_value at the same time")
        if t.force_color and t.force_gray:
            raise LayerConfigError("transform_param: cannot set both force_color and force_gray")
        self.color = color_flag(t.force_color, t.force_gray)
        self.scale, self.mirror = f32(t.scale), bool(t.mirror)
        self.crop_size = int(t.crop_size)
        self.crop_h = self.crop_size or int(t.crop_h)
        self.crop_w = self.crop_size or int(t.crop_w)
        if bool(self.crop_h) != bool(self.crop_w):
            raise LayerConfigError("transform_param: set crop_h and crop_w together")
        self.mean = load_mean_file(t.mean_file) if t.HasField("mean_file") else None
        self.mean_values = np.asarray(t.mean_value, f32)
        self.resize = _resize_param(t)
        self.distort = t.distort_param if t.HasField("distort_param") else None
        if self.distort is not None:
            check_distortion(self.distort, "transform_param.distort_param")
        self.expand = _expand_param(t, self.mean)
        self.emit = t.emit_constraint if t.HasField("emit_constraint") else None
        self.samplers = list(a.batch_sampler)
        for i, sampler in enumerate(self.samplers):
            check_sampler(sampler, f"annotated_data_param.batch_sampler[{i}]")
        self._warned = False

    @property
    def needs_rng(self) -> bool:
        interp = self.resize is not None and len(self.resize.interp_mode) > 1
        random_crop = self.phase == "TRAIN" and bool(self.crop_h)
        steps = (self.distort, self.expand)
        return bool(self.mirror or self.samplers or interp or random_crop or any(steps))

    # -- decoding and shapes ------------------------------------------------------------------
    def image(self, datum, where: str) -> tuple[np.ndarray, bool]:
        """The record's pixels as H x W x C uint8 BGR, and whether the record is raw."""
        try:
            if datum.encoded:
                chw = decode_image(datum.data, self.color, where)
            else:
                chw = datum_to_array(datum)
        except ImageError as exc:
            raise CaffeAlexError(exc.message) from None
        except CaffeAlexError as exc:
            raise CaffeAlexError(f"{where}: {exc.message}") from None
        if chw.dtype != np.uint8:
            raise CaffeAlexError(f"{where} holds float_data; AnnotatedData reads uint8 pixels")
        return np.ascontiguousarray(chw.transpose(1, 2, 0)), not datum.encoded

    def output_shape(self, h: int, w: int, c: int, raw: bool, where: str):
        """InferBlobShape: (C, H, W) of a record's transformed image."""
        if self.resize is not None:
            if raw:
                raise CaffeAlexError(
                    f"{where} is a raw (not encoded) image: the fork resizes only encoded "
                    "records (convert with --encoded)"
                )
            h, w = int(self.resize.height), int(self.resize.width)
        if raw and self.crop_h and not self.crop_size:
            raise CaffeAlexError(
                f"{where} is a raw (not encoded) image: the fork crops raw records to "
                "crop_size only, not crop_h / crop_w"
            )
        if self.crop_h and (h < self.crop_h or w < self.crop_w):
            raise CaffeAlexError(
                f"{where}: crop {self.crop_h}x{self.crop_w} is larger than the {h}x{w} image"
            )
        return (c, self.crop_h or h, self.crop_w or w)

    # -- the transform --------------------------------------------------------------------
    def __call__(self, record, rng, where: str) -> tuple[np.ndarray, Boxes]:
        image, raw = self.image(record.datum, where)
        boxes = Boxes.from_groups(record.annotation_group)
        if self.distort is not None:
            if raw:
                if not self._warned:
                    get_logger().warning("%s: the fork distorts only encoded records", where)
                    self._warned = True
            else:
                if image.shape[2] != 3:
                    raise CaffeAlexError(
                        f"{where}: distort_param needs a colour image, this one has "
                        f"{image.shape[2]} channel(s) (set force_color)"
                    )
                image = distort_image(image, self.distort, rng)
        if self.expand is not None:
            image, boxes = self._expand(image, boxes, raw, rng, where)
        if self.samplers:
            samples = generate_samples(boxes.box, self.samplers, rng)
            if samples:
                box = samples[int(rng.integers(len(samples)))]
                image = crop_image(image, box)
                if image.shape[0] == 0 or image.shape[1] == 0:
                    raise CaffeAlexError(
                        f"{where}: the sampled crop {box.tolist()} has no whole pixel"
                    )
                boxes = transform_boxes(boxes, clip(box), self.emit)
        return self._transform(image, boxes, raw, rng, where)

    def _fill(self, channels: int, raw: bool, where: str):
        if raw:
            return [_RAW_EXPAND_FILL] * channels
        if not self.mean_values.size:
            return [0] * channels
        values = self._channel_means(channels, where)
        return np.clip(np.rint(values), 0, 255).astype(np.uint8)

    def _channel_means(self, channels: int, where: str) -> np.ndarray:
        try:
            return channel_means(self.mean_values, channels)
        except LayerConfigError as exc:  # a ValueError: its text is str(exc)
            raise CaffeAlexError(f"{where}: {exc}") from None

    def _expand(self, image, boxes, raw, rng, where):
        p = self.expand
        if rng.random() > p.prob or abs(p.max_expand_ratio - 1) < 1e-2:
            return image, boxes
        ratio = rng.uniform(1, p.max_expand_ratio)
        canvas, placed = expand_canvas(image, ratio, self._fill(image.shape[2], raw, where), rng)
        return canvas, transform_boxes(boxes, placed, self.emit)

    def _transform(self, image, boxes, raw, rng, where):
        mirror = self.mirror and bool(rng.integers(2))
        old_h, old_w, c = image.shape
        self.output_shape(old_h, old_w, c, raw, where)  # the checks
        if self.resize is not None:
            pads = len(self.resize.pad_value)
            if pads not in (0, 1, c):
                raise CaffeAlexError(
                    f"{where}: specify either 1 pad_value or as many as channels ({c}); got {pads}"
                )
            image = resize_image(image, self.resize, rng)
        h, w = image.shape[:2]
        y, x, height, width = self._crop_window(h, w, rng)
        crop = np.array([f32(x) / f32(w), f32(y) / f32(h), f32(x + width) / f32(w),
                         f32(y + height) / f32(h)], f32)  # fmt: skip
        pixels = image[y : y + height, x : x + width].transpose(2, 0, 1).astype(f32)
        pixels = self._centred(pixels, mirror, (c, h, w), (y, x, height, width), raw, where)
        pixels = np.ascontiguousarray(pixels * self.scale, dtype=f32)
        resize = None if self.resize is None else (self.resize, old_w, old_h)
        return pixels, transform_boxes(boxes, crop, self.emit, mirror, resize)

    def _crop_window(self, h: int, w: int, rng) -> tuple[int, int, int, int]:
        """(y, x, height, width) of the crop of an h x w image: random in TRAIN, centred
        otherwise; the whole image without a crop."""
        if not self.crop_h:
            return 0, 0, h, w
        height, width = self.crop_h, self.crop_w
        if self.phase == "TRAIN":
            y = int(rng.integers(h - height + 1))
            x = int(rng.integers(w - width + 1))
        else:
            y, x = (h - height) // 2, (w - width) // 2
        return y, x, height, width

    def _centred(self, pixels, mirror: bool, shape, window, raw: bool, where: str):
        """The cropped ``pixels`` less the mean (mean_file or mean_value), mirrored where
        ``mirror``; ``shape`` (C, H, W) is the image's before the crop ``window``."""
        if self.mean is not None:
            mean = self._mean_region(*shape, *window, raw, where)
            if raw:  # raw records: the mean at the pixel's source position moves with it
                pixels -= mean
                if mirror:
                    pixels = pixels[:, :, ::-1]
            else:  # decoded images: the mean at the output position
                if mirror:
                    pixels = pixels[:, :, ::-1]
                pixels = pixels - mean
            return pixels
        if mirror:
            pixels = pixels[:, :, ::-1]
        if self.mean_values.size:
            pixels = pixels - self._channel_means(shape[0], where)[:, None, None]
        return pixels

    def _mean_region(self, c, h, w, y, x, height, width, raw, where):
        if tuple(self.mean.shape) != (c, h, w):
            raise CaffeAlexError(
                f"{where}: the mean_file has shape {tuple(self.mean.shape)} but the image is "
                f"{(c, h, w)}; they must be equal"
            )
        if not raw and (height, width) != (h, w):
            raise CaffeAlexError(
                f"{where}: mean_file with a crop is not supported for encoded records (the "
                "fork checks the crop against the mean's size but reads the mean by the "
                "uncropped image)"
            )
        return self.mean[:, y : y + height, x : x + width]


def has_box_type(record, lp) -> bool:
    """The fork's has_anno_type_: the first record has a type, or the layer sets anno_type."""
    return record.HasField("type") or lp.annotated_data_param.HasField("anno_type")


class AnnotatedSource(Source):
    """AnnotatedData: data_param source, backend, rand_skip, batch_size; the transform of
    AnnotatedTransformer. ``box_rows``: the label top holds box rows (a BBOX source with two
    tops); otherwise a second top holds each record's Datum label."""

    needs_rng = True

    def __init__(self, lp, phase, seed, shuffle: bool = False):
        super().__init__(lp, phase, seed)
        open_records(self, lp.data_param, seed, shuffle)
        try:
            self.transform = AnnotatedTransformer(lp, phase)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None
        self.needs_rng = self.transform.needs_rng
        first = self._record(self.keys[0])
        self.box_rows = has_box_type(first, lp) and len(lp.top) > 1
        self.labels = len(lp.top) > 1

    def __len__(self):
        return len(self.keys)

    def where(self, position: int) -> str:
        key = self.keys[self.order.epoch_and_index(position)[1]]
        return f"record '{key.decode(errors='replace')}' of '{self.path}'"

    def _record(self, key: bytes):
        where = f"record '{key.decode(errors='replace')}' of '{self.path}'"
        try:
            return parse_annotated(self.db.get(key), where)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None

    def sample(self, position: int, rng) -> list[np.ndarray]:
        record = self._record(self.keys[self.order.epoch_and_index(position)[1]])
        where = self.where(position)
        if self.box_rows and record.type != BBOX:
            raise self.fail(f"{where}: unknown annotation type {record.type}")
        try:
            image, boxes = self.transform(record, rng, where)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None
        if self.box_rows:
            return [image, boxes.rows()]
        if not self.labels:
            return [image]
        if not record.datum.HasField("label"):
            raise self.fail(f"{where}: the record has neither an annotation type nor a label")
        return [image, np.full((1, 1, 1), record.datum.label, f32)]


def stack_box_rows(rows: list[np.ndarray]) -> np.ndarray:
    """The label top of a batch: each image's rows behind its index, (1, 1, rows, 8); one row
    of -1 when the batch has no box (the fork's placeholder)."""
    parts = [np.concatenate([np.full((len(r), 1), i, f32), r], 1) for i, r in enumerate(rows)]
    stacked = np.concatenate(parts) if parts else np.zeros((0, 8), f32)
    if not len(stacked):
        stacked = np.full((1, 8), -1, f32)
    return stacked.reshape(1, 1, -1, 8)


__all__ = ["AnnotatedSource", "AnnotatedTransformer", "DataError", "stack_box_rows"]
