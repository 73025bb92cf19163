"""WindowData (R-CNN's fine-tuning input): windows of images listed in a window file, each
warped to crop_size x crop_size, as Caffe's WindowDataLayer makes them.

The window file is a stream of records: ``# image_index``, image path, channels, height, width,
number of windows, then ``class overlap x1 y1 x2 y2`` per window. Windows with overlap >=
fg_threshold are foreground (their class), those below bg_threshold background (label 0).
Each batch holds ``int(batch * fg_fraction)`` foreground windows after the background ones
(Caffe fills background first); each item draws a window from its list, then a mirror coin.
Images are read with OpenCV's imread in colour and windows warped with its resize (INTER_LINEAR),
through datum.py, so the pixels are Caffe's (with cache_images Caffe decodes the file's bytes
with imdecode instead, which gives the same pixels).
"""

from __future__ import annotations

import itertools
import math
import os
import re
import warnings
from collections import deque
from typing import NamedTuple

import numpy as np

from ..errors import CaffeAlexError, describe
from ..formats.blobs import blob_proto_to_array, read_blob_proto
from ..log import get_logger
from .datum import load_image, resize_linear
from .sources import Source, _check_source_path

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
f32 = np.float32


class Image(NamedTuple):
    path: str  # root_folder + the listed path
    channels: int
    line: int  # of its path


class WindowFile(NamedTuple):
    images: list[Image]
    fg: np.ndarray  # int32 rows of COLUMNS
    bg: np.ndarray
    histogram: dict[int, int]  # windows per class, background as class 0


# A window's row: its image (the record at that position in the file: Caffe indexes images by
# '# image_index'), its label, its box and the line it is on.
COLUMNS = ("image", "label", "x1", "y1", "x2", "y2", "line")


class _Reader:
    """Caffe reads the file as whitespace-separated tokens (operator>>); this reads them with
    their line numbers, and blocks of window lines at once (R-CNN's files hold millions)."""

    def __init__(self, path: str, f):
        self.path, self.f, self.number = path, f, 0
        self.tokens, self.lines = deque(), deque()  # lines read ahead and given back

    def _readline(self) -> str:
        return self.lines.popleft() if self.lines else self.f.readline()

    def more(self) -> bool:
        while not self.tokens:
            line = self._readline()
            if not line:
                return False
            self.number += 1
            self.tokens.extend(line.split())
        return True

    def take(self, what: str, pattern=None, convert=str):
        if not self.more():
            raise CaffeAlexError(f"{self.path}:{self.number}: the file ends where {what} should be")
        token = self.tokens.popleft()
        if pattern is not None and not pattern.fullmatch(token):
            raise CaffeAlexError(f"{self.path}:{self.number}: expected {what}, got {token!r}")
        return convert(token)

    def windows(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``count`` windows: (count, 6) values and the line of each."""
        if not self.tokens and not self.lines:  # the usual layout: one window a line
            block = list(itertools.islice(self.f, count))
            values = _parse_block(block, count)
            if values is not None:
                lines = self.number + 1 + np.arange(count)
                self.number += len(block)
                return values, lines
            self.lines.extend(block)  # read them token by token for the error's place
        rows, lines = [], []
        for _ in range(count):
            row = [self.take("a window's class index", _INT, int)]
            lines.append(self.number)
            row.append(self.take("a window's overlap", _FLOAT, float))
            row += [self.take("a window coordinate", _INT, int) for _ in range(4)]
            rows.append(row)
        return np.array(rows, np.float64).reshape(count, 6), np.array(lines, np.int64)


def _parse_block(block: list[str], count: int) -> np.ndarray | None:
    """The block's numbers as (count, 6), or None where anything is off."""
    try:
        with warnings.catch_warnings():  # older numpy warns where newer raises
            warnings.simplefilter("error", DeprecationWarning)
            values = np.fromstring("".join(block), dtype=np.float64, sep=" ")
    except (ValueError, DeprecationWarning):
        return None
    if values.size != 6 * count or not np.isfinite(values).all():
        return None
    values = values.reshape(count, 6)
    ints = values[:, [0, 2, 3, 4, 5]]
    return values if np.array_equal(ints, np.round(ints)) else None


def read_window_file(path: str, root_folder: str, fg_threshold, bg_threshold) -> WindowFile:
    with open(path, errors="replace") as f:
        reader = _Reader(path, f)
        if not reader.more():
            raise CaffeAlexError(f"window file '{path}' is empty")
        images, indices, fg, bg = [], [], [], []
        while reader.more():
            line = reader.number
            tag = reader.take("'#'")
            if tag != "#":
                raise CaffeAlexError(
                    f"{path}:{line}: expected '#' to start an image record, got {tag!r}"
                )
            indices.append((reader.take("an image index after '#'", _INT, int), line))
            name, at = reader.take("an image path"), reader.number
            channels = reader.take("the image's channel count", _INT, int)
            images.append(Image(root_folder + name, channels, at))
            reader.take("the image's height", _INT)
            reader.take("the image's width", _INT)
            count = reader.take("the image's number of windows", _INT, int)
            values, lines = reader.windows(count)
            _split(path, indices[-1][0], values, lines, fg_threshold, bg_threshold, fg, bg)
    _check_indices(path, indices, len(images))
    fg = np.concatenate(fg) if fg else np.zeros((0, len(COLUMNS)), np.int32)
    bg = np.concatenate(bg) if bg else np.zeros((0, len(COLUMNS)), np.int32)
    histogram = {0: len(bg)}
    labels, counts = np.unique(fg[:, 1], return_counts=True)
    histogram.update(zip(labels.tolist(), counts.tolist()))
    return WindowFile(images, fg, bg, dict(sorted(histogram.items())))


def _split(path, image, values, lines, fg_threshold, bg_threshold, fg, bg) -> None:
    """Caffe's rule: overlap >= fg_threshold is foreground (class > 0 required), else below
    bg_threshold background (label 0); windows in between are dropped."""
    overlap = values[:, 1].astype(np.float32)
    is_fg = overlap >= np.float32(fg_threshold)
    is_bg = ~is_fg & (overlap < np.float32(bg_threshold))
    rows = np.empty((len(values), len(COLUMNS)), np.int32)  # 28 bytes a window
    rows[:, 0], rows[:, 1], rows[:, 2:6], rows[:, 6] = image, values[:, 0], values[:, 2:], lines
    bad = is_fg & (rows[:, 1] <= 0)
    if bad.any():  # Caffe's CHECK_GT(label, 0)
        k = int(np.argmax(bad))
        raise CaffeAlexError(
            f"{path}:{rows[k, 6]}: a foreground window (overlap {values[k, 1]:g} >= "
            f"fg_threshold) needs a class > 0, got {rows[k, 1]}"
        )
    rows[is_bg, 1] = 0
    fg.append(rows[is_fg])
    bg.append(rows[is_bg])


def _check_indices(path: str, indices: list[tuple[int, int]], n: int) -> None:
    for index, line in indices:
        if not 0 <= index < n:
            raise CaffeAlexError(
                f"{path}:{line}: image index {index} is out of range: Caffe finds a window's "
                f"image at that position among the {n} records of the file"
            )
    if [i for i, _ in indices] != list(range(n)):
        get_logger().warning(
            "%s: the image indices do not count 0, 1, 2, ... in file order; as in Caffe, a "
            "window's image is the record at the position its '# image_index' names",
            path,
        )


def caffe_round(value) -> int:
    """C's round(): halves away from zero (numpy's rint rounds them to even)."""
    value = float(value)
    return int(math.copysign(math.floor(abs(value) + 0.5), value))


def window_geometry(box, rows, cols, crop, context_pad, square, mirror):
    """Caffe's arithmetic (in float32) for one window: the clipped box (x1, y1, x2, y2) to cut
    from the image, its warped (height, width) and where it sits in the output (pad_h, pad_w).

    With context_pad or square mode the box grows about its centre so that warping it to crop
    leaves context_pad pixels of context each side; the part outside the image is cut off and
    shows as zeros, sized by the scale of the unclipped box, mirrored with the window."""
    x1, y1, x2, y2 = box
    if not (context_pad > 0 or square):
        return (x1, y1, x2, y2), (crop, crop), 0, 0
    context_scale = f32(crop) / f32(crop - 2 * context_pad)
    half_h, half_w = f32((y2 - y1 + 1) / 2.0), f32((x2 - x1 + 1) / 2.0)
    center_x, center_y = f32(x1) + half_w, f32(y1) + half_h
    if square:
        half_h = half_w = max(half_h, half_w)
    x1 = caffe_round(center_x - half_w * context_scale)
    x2 = caffe_round(center_x + half_w * context_scale)
    y1 = caffe_round(center_y - half_h * context_scale)
    y2 = caffe_round(center_y + half_h * context_scale)
    unclipped_h, unclipped_w = y2 - y1 + 1, x2 - x1 + 1
    pad_x1, pad_y1 = max(0, -x1), max(0, -y1)
    pad_x2, pad_y2 = max(0, x2 - cols + 1), max(0, y2 - rows + 1)
    x1, x2, y1, y2 = x1 + pad_x1, x2 - pad_x2, y1 + pad_y1, y2 - pad_y2
    scale_x, scale_y = f32(crop) / f32(unclipped_w), f32(crop) / f32(unclipped_h)
    width = caffe_round(f32(x2 - x1 + 1) * scale_x)
    height = caffe_round(f32(y2 - y1 + 1) * scale_y)
    pad_x1, pad_x2 = caffe_round(f32(pad_x1) * scale_x), caffe_round(f32(pad_x2) * scale_x)
    pad_h = caffe_round(f32(pad_y1) * scale_y)
    pad_w = pad_x2 if mirror else pad_x1
    # rounding can overshoot the output: Caffe trims the warped size to fit
    height, width = min(height, crop - pad_h), min(width, crop - pad_w)
    return (x1, y1, x2, y2), (height, width), pad_h, pad_w


def mean_crop(path: str, crop: int, channels: int = 3) -> np.ndarray:
    """The (channels, crop, crop) part of a mean_file that Caffe subtracts at each output pixel:
    it starts (W - crop) / 2 in along both axes (the width's offset for the rows too) and is
    read through the blob's flat data with the legacy height and width."""
    proto = read_blob_proto(path)
    legacy = any(proto.HasField(f) for f in ("num", "channels", "height", "width"))
    if legacy:
        proto.ClearField("shape")
    shape = blob_proto_to_array(proto).shape
    if len(shape) > 4:
        raise CaffeAlexError(f"mean_file '{path}' has {len(shape)} axes; Caffe reads at most 4")
    flat = blob_proto_to_array(proto).ravel()
    height = shape[2] if len(shape) > 2 else 1
    width = shape[3] if len(shape) > 3 else 1
    offset = int((width - crop) / 2)  # C's division truncates
    c, y, x = np.ogrid[:channels, :crop, :crop]
    index = (c * height + y + offset) * width + x + offset
    if width < crop or index.max() >= flat.size:
        raise CaffeAlexError(
            f"mean_file '{path}' of shape {shape} is too small for crop_size "
            f"{crop}: Caffe reads its centre {crop}x{crop} in {channels} "
            "channels"
        )
    return flat[index].astype(np.float32)


class WindowSource(Source):
    """window_data_param: source, root_folder, fg_threshold, bg_threshold, fg_fraction,
    context_pad, crop_mode, cache_images, scale; transform_param: crop_size, mirror, mean_file,
    mean_value. As in Caffe, transform_param.scale is not read (window_data_param.scale is), nor
    are window_data_param's mean_file, mirror and crop_size."""

    needs_rng = True
    world_size = 1  # set by the feed: the item's place in its batch decides background or not

    def __init__(self, lp, phase, seed):
        super().__init__(lp, phase, seed)
        p, t = lp.window_data_param, lp.transform_param
        self.path = p.source
        _check_source_path(self, p.source)
        try:
            self.file = read_window_file(p.source, p.root_folder, p.fg_threshold, p.bg_threshold)
        except (CaffeAlexError, OSError) as exc:
            message = getattr(exc, "message", None) or f"cannot read '{p.source}': {describe(exc)}"
            raise self.fail(message) from None
        self.batch, self.crop = int(p.batch_size), int(t.crop_size)
        self.num_fg = int(f32(self.batch) * f32(p.fg_fraction))
        self.context_pad, self.square = int(p.context_pad), p.crop_mode == "square"
        self.mirror, self.scale = bool(t.mirror), f32(p.scale)
        self._check(p, t)
        self.mean = self.mean_values = None
        try:
            if t.HasField("mean_file"):
                self.mean = mean_crop(t.mean_file, self.crop)
        except CaffeAlexError as exc:
            raise self.fail(exc.message) from None
        if len(t.mean_value):
            self.mean_values = np.resize(np.asarray(t.mean_value, np.float32), 3)[:, None, None]
        self.cache = None
        if p.cache_images:  # decoded once here; forked workers share the pages
            self.cache = [self._read(image) for image in self.file.images]
        self._log(p)

    def _check(self, p, t) -> None:
        last, fg, bg = self.file.images[-1], len(self.file.fg), len(self.file.bg)
        problems = [
            (self.crop <= 0, "transform_param.crop_size must be > 0"),
            (
                last.channels != 3,
                f"{self.path}:{last.line}: the last image record gives "
                f"{last.channels} channels; Caffe shapes the data top with it but decodes every "
                "image in colour, so only 3 works",
            ),
            (
                not fg,
                f"'{self.path}' has no foreground window (overlap >= fg_threshold "
                f"{p.fg_threshold:g}); Caffe needs at least one",
            ),
            (
                not bg,
                f"'{self.path}' has no background window (overlap < bg_threshold "
                f"{p.bg_threshold:g}); Caffe needs at least one",
            ),
            (not 0 <= p.fg_fraction <= 1, f"fg_fraction {p.fg_fraction:g} is outside [0, 1]"),
            (
                (self.context_pad > 0 or self.square) and 2 * self.context_pad >= self.crop,
                f"context_pad {self.context_pad} leaves no room in crop_size {self.crop}",
            ),
            (
                t.HasField("mean_file") and len(t.mean_value) > 0,
                "cannot specify mean_file and mean_value at the same time",
            ),
            (
                len(t.mean_value) not in (0, 1, 3),
                f"specify either 1 mean_value or as many as channels (3); got {len(t.mean_value)}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise self.fail(message)

    def _log(self, p) -> None:
        log = get_logger()
        ignored = [
            f"window_data_param.{f}" for f in ("mean_file", "mirror", "crop_size") if p.HasField(f)
        ]
        if self.lp.transform_param.HasField("scale"):
            ignored.append("transform_param.scale (window_data_param.scale is the one it uses)")
        if ignored:
            log.warning(
                "layer '%s' (WindowData): Caffe does not read %s", self.name, ", ".join(ignored)
            )
        if p.crop_mode not in ("warp", "square"):
            log.warning(
                "layer '%s': crop_mode '%s' warps, as Caffe does for any mode but 'square'",
                self.name,
                p.crop_mode,
            )
        log.info(
            "Window data layer '%s': fg_threshold %g, bg_threshold %g, fg_fraction %g, "
            "cache_images %s, root_folder '%s', context_pad %d, crop_mode %s",
            self.name,
            p.fg_threshold,
            p.bg_threshold,
            p.fg_fraction,
            p.cache_images,
            p.root_folder,
            p.context_pad,
            p.crop_mode,
        )
        log.info("Number of images: %d", len(self.file.images))
        for label, count in self.file.histogram.items():
            log.info("class %d has %d samples", label, count)

    def __len__(self):
        return len(self.file.fg) + len(self.file.bg)

    def where(self, position: int) -> str:
        item = (position // self.world_size) % self.batch
        return f"item {item} of a batch from window file '{self.path}'"

    def _read(self, image: Image) -> np.ndarray:
        where = f"{self.path}:{image.line}"
        if not os.path.isfile(image.path):
            raise self.fail(f"{where}: image '{image.path}' does not exist")
        try:
            return load_image(image.path, True)  # Caffe reads with CV_LOAD_IMAGE_COLOR
        except CaffeAlexError as exc:
            raise self.fail(f"{where}: {exc.message}") from None

    def sample(self, position: int, rng) -> list[np.ndarray]:
        item = (position // self.world_size) % self.batch
        windows = self.file.fg if item >= self.batch - self.num_fg else self.file.bg
        index, label, *box, line = windows[int(rng.integers(len(windows)))].tolist()
        mirror = self.mirror and bool(rng.integers(2))
        if self.cache is not None:
            image = self.cache[index]
        else:
            image = self._read(self.file.images[index])
        return [self.warp(image, tuple(box), line, mirror), np.float32(label)]

    def warp(self, image: np.ndarray, box, line: int, mirror: bool) -> np.ndarray:
        """Window ``box`` (x1, y1, x2, y2; on ``line`` of the file) of a (3, H, W) uint8 BGR
        image -> (3, crop, crop) float32."""
        _, rows, cols = image.shape
        (x1, y1, x2, y2), (height, width), pad_h, pad_w = window_geometry(
            box, rows, cols, self.crop, self.context_pad, self.square, mirror
        )
        if not (0 <= x1 <= x2 < cols and 0 <= y1 <= y2 < rows) or height <= 0 or width <= 0:
            raise self.fail(
                f"{self.path}:{line}: window {box} cut to {(x1, y1, x2, y2)} "
                f"is not a region of the {cols}x{rows} image (or warps to "
                f"{height}x{width}); Caffe's OpenCV calls fail on it"
            )
        patch = resize_linear(image[:, y1 : y2 + 1, x1 : x2 + 1], height, width)
        if mirror:  # cv::flip after the warp
            patch = patch[:, :, ::-1]
        region = (slice(None), slice(pad_h, pad_h + height), slice(pad_w, pad_w + width))
        pixels = patch.astype(np.float32)
        if self.mean is not None:  # indexed by the output position, not the image's
            pixels -= self.mean[region]
        elif self.mean_values is not None:
            pixels -= self.mean_values
        out = np.zeros((3, self.crop, self.crop), np.float32)  # outside the window stays 0
        out[region] = pixels * self.scale
        return out
