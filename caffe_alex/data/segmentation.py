"""The segmentation forks' data sources: images with a label image each.

``DenseImageSource``: caffe-segnet's DenseImageData (dense_image_data_param). Its list file is
read as whitespace-separated words taken in pairs, image then label image. Each pair: the image
read with ``is_color`` and resized bilinearly to new_height x new_width, the label image read
in grey and resized with nearest-neighbour (so no new class appears between two); mirror flips
both, then crop_height x crop_width is cut from both at the same random place (in both phases,
as the fork does); the image then goes through transform_param's mean and scale, the label
keeps its pixel values.

``ImageSegSource``: DeepLab v2's ImageSegData (image_data_param with label_type and
ignore_label; transform_param's crop_size or crop_height/crop_width, mirror, mean_value, scale
and scale_factors). Its list file is read by lines: the image path, then the label image (PIXEL)
or a class number for the whole image (IMAGE, the default); NONE needs no second word and
labels every pixel ignore_label. A label image is read in grey and resized bilinearly, as the
fork reads it. Per record, in the fork's order: the mirror coin, a factor drawn from
scale_factors (image rescaled bilinearly, labels with nearest-neighbour), then an image smaller
than the crop padded at its bottom and right (the image with mean_value, the labels with
ignore_label), then the crop (random in TRAIN, centred in TEST). The third top holds each
image's height and width as read, at most the data top's.

Both give float32 arrays (transformed on the CPU); random draws come in the fork's order from
the generator the loader passes per record.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import CaffeAlexError, LayerConfigError
from ..proto import caffe_pb2
from .datum import ImageError, load_image, resize_linear
from .sources import Order, Source, _check_source_path
from .transformer import DataTransformer

_LabelType = caffe_pb2.ImageDataParameter


def read_pairs(path: str) -> list[tuple[str, str, int]]:
    """DenseImageData's list: (image, label image, line of the image's word). The fork reads
    words in pairs whatever the lines, and drops a last word without a partner."""
    words = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words.extend((word, number) for word in line.split())
    return [(words[i][0], words[i + 1][0], words[i][1]) for i in range(0, len(words) - 1, 2)]


def read_seg_lines(path: str, label_type: int) -> list[tuple[str, str, int]]:
    """ImageSegData's list: (image, second word or "", line number), one entry per line."""
    entries = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            words = line.split()
            if not words:  # the fork would take an empty image path and fail on reading it
                raise CaffeAlexError(f"{path}:{number}: empty line (expected '<image> <label>')")
            second = words[1] if len(words) > 1 else ""
            if label_type == _LabelType.PIXEL and not second:
                raise CaffeAlexError(
                    f"{path}:{number}: no label image after '{words[0]}' (label_type PIXEL)"
                )
            entries.append((words[0], second if label_type != _LabelType.NONE else "", number))
    return entries


def c_atoi(text: str) -> int:
    """C's atoi: optional blanks and sign, then the leading digits; 0 where there are none."""
    text = text.lstrip()
    sign, digits = 1, ""
    if text[:1] and text[0] in "+-":
        sign, text = (-1 if text[0] == "-" else 1), text[1:]
    for ch in text:
        if ch not in "0123456789":
            break
        digits += ch
    return sign * int(digits) if digits else 0


def _uchar(value: int) -> int:
    """cv::Scalar into a CV_8U image: saturated to [0, 255]."""
    return min(max(int(value), 0), 255)


def resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """1 x H x W uint8 -> 1 x height x width with cv::resize(INTER_NEAREST)."""
    out = cv2.resize(array[0], (int(width), int(height)), interpolation=cv2.INTER_NEAREST)
    return out[None]


def dense_crop(p) -> tuple[int, int]:
    """DenseImageData's (crop_height, crop_width), checked as the fork's DataLayerSetUp does."""
    if (p.new_height > 0) != (p.new_width > 0):
        raise LayerConfigError("dense_image_data_param: set new_height and new_width together")
    if (p.crop_height > 0) != (p.crop_width > 0):
        raise LayerConfigError("dense_image_data_param: set crop_height and crop_width together")
    return int(p.crop_height), int(p.crop_width)


def seg_crop(lp) -> tuple[int, int]:
    """ImageSegData's (crop_height, crop_width) from transform_param, with the fork's checks."""
    t, p = lp.transform_param, lp.image_data_param
    if t.HasField("mean_file"):
        raise LayerConfigError(
            "ImageSegData does not support transform_param.mean_file (the fork refuses it); "
            "use mean_value"
        )
    if (p.new_height > 0) != (p.new_width > 0):
        raise LayerConfigError("image_data_param: set new_height and new_width together")
    has_h, has_w = t.HasField("crop_height"), t.HasField("crop_width")
    if not ((not t.HasField("crop_size") and has_h and has_w) or (not has_h and not has_w)):
        raise LayerConfigError(
            "transform_param: give either crop_size or both crop_height and crop_width"
        )
    if t.HasField("crop_size"):
        return int(t.crop_size), int(t.crop_size)
    return (int(t.crop_height), int(t.crop_width)) if has_h else (0, 0)


class _ListSource(Source):
    """A list of (image, second word, line); positions map to entries through ``order``."""

    needs_rng = True

    def __init__(self, lp, phase, seed, param, entries_of):
        super().__init__(lp, phase, seed)
        self.param = param
        self.list_path = param.source
        _check_source_path(self, self.list_path)
        try:
            self.entries = entries_of(self.list_path)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise self.fail(f"cannot read list '{self.list_path}': {exc}") from None
        if not self.entries:
            raise self.fail(f"list '{self.list_path}' names no image")
        try:
            self.order = Order(len(self.entries), seed, param.shuffle, param.rand_skip)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None

    def __len__(self):
        return len(self.entries)

    def entry(self, position: int) -> tuple[str, str, int]:
        return self.entries[self.order.epoch_and_index(position)[1]]

    def where(self, position: int) -> str:
        image, second, line = self.entry(position)
        shown = f"{image} {second}".rstrip()
        return f"line {line} of '{self.list_path}' ('{shown}')"

    def _read(self, position: int, path: str, color: bool, height=0, width=0) -> np.ndarray:
        try:
            return load_image(self.param.root_folder + path, color, height, width)
        except (ImageError, CaffeAlexError) as exc:
            raise self.fail(f"{self.where(position)}: {_message(exc)}") from None


def _message(exc: Exception) -> str:
    return exc.message if isinstance(exc, CaffeAlexError) else str(exc)


class DenseImageSource(_ListSource):
    """caffe-segnet's DenseImageData (see the module's notes)."""

    def __init__(self, lp, phase, seed):
        p = lp.dense_image_data_param
        super().__init__(lp, phase, seed, p, read_pairs)
        self.crop = dense_crop(p)
        self.transform = DataTransformer(lp.transform_param, phase)  # mean and scale only
        self.needs_rng = bool(p.mirror) or self.crop[0] > 0

    def sample(self, position: int, rng) -> list[np.ndarray]:
        p = self.param
        image_path, label_path, _ = self.entry(position)
        image = self._read(position, image_path, bool(p.is_color), p.new_height, p.new_width)
        label = self._read(position, label_path, False)
        if p.new_height > 0:  # the labels nearest-neighbour (the image is bilinear)
            label = resize_nearest(label, p.new_height, p.new_width)
        if label.shape[1:] != image.shape[1:]:
            raise self.fail(
                f"{self.where(position)}: the label image is {label.shape[1]}x{label.shape[2]} "
                f"but the image {image.shape[1]}x{image.shape[2]}; they must match"
            )
        if p.mirror and rng.integers(2):
            image, label = image[:, :, ::-1], label[:, :, ::-1]
        crop_h, crop_w = self.crop
        if crop_h:
            h, w = image.shape[1:]
            if crop_h > h or crop_w > w:
                raise self.fail(
                    f"{self.where(position)}: crop {crop_h}x{crop_w} is larger than the "
                    f"{h}x{w} image"
                )
            h_off, w_off = int(rng.integers(h - crop_h + 1)), int(rng.integers(w - crop_w + 1))
            rows, cols = slice(h_off, h_off + crop_h), slice(w_off, w_off + crop_w)
            image, label = image[:, rows, cols], label[:, rows, cols]
        try:
            data = self.transform(np.ascontiguousarray(image))
        except (CaffeAlexError, ValueError) as exc:
            raise self.fail(f"{self.where(position)}: {_message(exc)}") from None
        return [data, label.astype(np.float32)]


class ImageSegSource(_ListSource):
    """DeepLab v2's ImageSegData (see the module's notes)."""

    def __init__(self, lp, phase, seed):
        p = lp.image_data_param
        self.label_type = p.label_type
        super().__init__(lp, phase, seed, p, lambda path: read_seg_lines(path, p.label_type))
        try:
            self.crop = seg_crop(lp)
        except LayerConfigError as exc:
            raise self.fail(str(exc)) from None
        t = lp.transform_param
        self.phase = phase.upper()
        self.mirror, self.scale = bool(t.mirror), np.float32(t.scale)
        self.factors = np.asarray(t.scale_factors, np.float32)
        self.mean_values = np.asarray(t.mean_value, np.float32)
        self.ignore = _uchar(p.ignore_label)
        self.needs_rng = (
            self.mirror or self.factors.size > 0 or (self.phase == "TRAIN" and self.crop[0] > 0)
        )
        self.size = self.crop if self.crop[0] else self._first_size()

    def _first_size(self) -> tuple[int, int]:
        """The data top's height and width without a crop: the first listed image's."""
        p = self.param
        image = self._read(0, self.entries[0][0], bool(p.is_color), p.new_height, p.new_width)
        return image.shape[1], image.shape[2]

    def _label(self, position, second, rows, cols) -> np.ndarray:
        p = self.param
        if self.label_type == _LabelType.PIXEL:
            label = self._read(position, second, False, p.new_height, p.new_width)
            if label.shape[1:] != (rows, cols):
                raise self.fail(
                    f"{self.where(position)}: the label image is {label.shape[1]}x"
                    f"{label.shape[2]} but the image {rows}x{cols}; they must match"
                )
            return label
        value = _uchar(c_atoi(second)) if self.label_type == _LabelType.IMAGE else self.ignore
        return np.full((1, rows, cols), value, np.uint8)

    def _means(self, channels: int) -> np.ndarray | None:
        """mean_value, one per channel (a single one repeated), or None where unset."""
        if not self.mean_values.size:
            return None
        if self.mean_values.size == 1:
            return np.repeat(self.mean_values, channels)
        if self.mean_values.size == channels:
            return self.mean_values
        raise self.fail(
            f"specify either 1 mean_value or as many as channels ({channels}); got "
            f"{self.mean_values.size}"
        )

    def sample(self, position: int, rng) -> list[np.ndarray]:
        p = self.param
        image_path, second, _ = self.entry(position)
        image = self._read(position, image_path, bool(p.is_color), p.new_height, p.new_width)
        channels, rows, cols = image.shape
        label = self._label(position, second, rows, cols)
        means = self._means(channels)
        do_mirror = self.mirror and bool(rng.integers(2))
        if self.factors.size:
            image, label = self._scaled(position, image, label, rng)
        data, label = self._padded(position, image.astype(np.float64), label, means)
        out_h, out_w = self.size
        h_off, w_off = self._crop_offsets(position, *data.shape[1:], rng)
        rows_, cols_ = slice(h_off, h_off + out_h), slice(w_off, w_off + out_w)
        pixels = data[:, rows_, cols_].astype(np.float32)
        if means is not None:
            pixels = pixels - means[:, None, None]
        pixels = pixels * self.scale
        label = label[:, rows_, cols_].astype(np.float32)
        if do_mirror:
            pixels, label = pixels[:, :, ::-1], label[:, :, ::-1]
        dims = np.array([[[min(out_h, rows), min(out_w, cols)]]], np.float32)
        return [np.ascontiguousarray(pixels), np.ascontiguousarray(label), dims]

    def _scaled(self, position, image, label, rng):
        """The image and labels rescaled by a factor drawn from scale_factors."""
        factor = self.factors[int(rng.integers(self.factors.size))]
        if factor == 1:
            return image, label
        h, w = image.shape[1:]  # the fork's int *= float: the product truncated
        h, w = int(np.float32(h) * factor), int(np.float32(w) * factor)
        return self._rescaled(position, image, label, h, w)

    def _padded(self, position, data, label, means):
        """The image (float64) and labels padded at the bottom and right to the crop, with
        mean_value and ignore_label."""
        channels, h, w = data.shape
        crop_h, crop_w = self.crop
        pad_h, pad_w = max(crop_h - h, 0), max(crop_w - w, 0)
        if not (pad_h or pad_w):
            return data, label
        if means is None:
            raise self.fail(
                f"{self.where(position)}: the {h}x{w} image is smaller than the crop "
                f"{crop_h}x{crop_w}; the fork pads it with mean_value, which is not set"
            )
        data = np.concatenate([np.pad(data[c], ((0, pad_h), (0, pad_w)),
                                      constant_values=np.float64(means[c]))[None]
                               for c in range(channels)])  # fmt: skip
        label = np.pad(label, ((0, 0), (0, pad_h), (0, pad_w)), constant_values=self.ignore)
        return data, label

    def _crop_offsets(self, position, h: int, w: int, rng) -> tuple[int, int]:
        """Where the data top's window starts in the h x w (padded) image: a crop random in
        TRAIN and centred in TEST, else the top-left corner (the fork copies that part)."""
        crop_h, crop_w = self.crop
        out_h, out_w = self.size
        if crop_h:
            if self.phase == "TRAIN":
                return int(rng.integers(h - crop_h + 1)), int(rng.integers(w - crop_w + 1))
            return (h - crop_h) // 2, (w - crop_w) // 2
        if h < out_h or w < out_w:  # the fork would read past the image
            raise self.fail(
                f"{self.where(position)}: the {h}x{w} image is smaller than the {out_h}x{out_w} "
                "data top (set by the first image; give crop_size or new_height/new_width)"
            )
        return 0, 0

    def _rescaled(self, position, image, label, h, w):
        try:
            return resize_linear(image, h, w), resize_nearest(label, h, w)
        except cv2.error as exc:
            raise self.fail(f"{self.where(position)}: cannot rescale to {h}x{w}: {exc}") from None
