"""Caffe's DataTransformer: crop, mirror, mean subtraction and scale of one image.

``DataTransformer(param, phase)(image, rng)`` does it all on the CPU (float records, and the
reference). For uint8 images the feed splits it: ``crop_region`` cuts the uint8 pixels
where the record is read, and device_transform.py subtracts the mean and scales on the device,
with the same float32 operations, so both give the same numbers.

Honours ``transform_param``: crop_size, mirror, mean_file, mean_value, scale, force_color,
force_gray. The order of operations is Caffe's: ``(pixel - mean) * scale``, where the mean is
indexed at the pixel's position in the *uncropped* image (so a mean_file contributes its crop
region) and mirroring only moves the result. Random draws come from a numpy Generator passed
per image, in Caffe's order: the mirror coin first, then the crop row, then the crop column.
"""

from __future__ import annotations

import numpy as np

from ..errors import CaffeAlexError, LayerConfigError
from ..formats.blobs import blob_proto_to_array, read_blob_proto
from ..proto import caffe_pb2


def load_mean_file(path: str) -> np.ndarray:
    """A mean .binaryproto as a float32 (C, H, W) array (Caffe keeps its first image)."""
    try:
        proto = read_blob_proto(path)
    except CaffeAlexError as exc:  # the builder adds the layer and line
        raise LayerConfigError(exc.message) from None
    array = blob_proto_to_array(proto)
    if array.ndim == 4:
        array = array[0]
    if array.ndim != 3:
        raise LayerConfigError(f"mean_file '{path}' has shape {array.shape}, expected (1, C, H, W)")
    return np.ascontiguousarray(array, dtype=np.float32)


class DataTransformer:
    """Transforms (C, H, W) uint8 or float images as Caffe's DataTransformer<float> does."""

    def __init__(self, param: caffe_pb2.TransformationParameter | None, phase: str = "TEST"):
        param = param or caffe_pb2.TransformationParameter()
        if param.HasField("mean_file") and len(param.mean_value):
            raise LayerConfigError("cannot specify mean_file and mean_value at the same time")
        if param.force_color and param.force_gray:
            raise LayerConfigError("transform_param: cannot set both force_color and force_gray")
        self.phase = phase.upper()
        self.crop = int(param.crop_size)
        self.mirror = bool(param.mirror)
        self.scale = np.float32(param.scale)
        self.force_color, self.force_gray = bool(param.force_color), bool(param.force_gray)
        self.mean = load_mean_file(param.mean_file) if param.HasField("mean_file") else None
        self.mean_values = np.asarray(param.mean_value, dtype=np.float32)

    @property
    def needs_rng(self) -> bool:
        # Caffe's InitRand: a generator only where a draw can happen.
        return self.mirror or (self.phase == "TRAIN" and self.crop > 0)

    def output_shape(self, chw: tuple[int, int, int]) -> tuple[int, int, int]:
        """Caffe's InferBlobShape for one image."""
        c, h, w = chw
        if c <= 0:
            raise LayerConfigError("images must have at least one channel")
        if self.crop and (h < self.crop or w < self.crop):
            raise LayerConfigError(f"crop_size {self.crop} is larger than the {h}x{w} image")
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def offsets(self, h: int, w: int, rng: np.random.Generator | None) -> tuple[bool, int, int]:
        """(mirror?, row offset, column offset), drawn in Caffe's order."""
        do_mirror = self.mirror and bool(rng.integers(2))
        if not self.crop:
            return do_mirror, 0, 0
        if self.phase == "TRAIN":  # Caffe's Rand(n) is uniform in [0, n)
            return (
                do_mirror,
                int(rng.integers(h - self.crop + 1)),
                int(rng.integers(w - self.crop + 1)),
            )
        return do_mirror, (h - self.crop) // 2, (w - self.crop) // 2

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
        """One (C, H, W) image -> float32 (C, crop or H, crop or W).

        Mirroring is drawn in both phases when ``mirror`` is set: Caffe's transformer does not
        look at the phase for it (only the crop offset is phase dependent)."""
        c, h, w = image.shape
        out_c, out_h, out_w = self.output_shape((c, h, w))
        do_mirror, h_off, w_off = self.offsets(h, w, rng)
        rows, cols = slice(h_off, h_off + out_h), slice(w_off, w_off + out_w)
        out = image[:, rows, cols].astype(np.float32)
        if self.mean is not None:
            self._check_mean(image.shape)
            out -= self.mean[:, rows, cols]
        elif self.mean_values.size:
            out -= self._channel_means(c)[:, None, None]
        if self.scale != 1:
            out *= self.scale
        return out[:, :, ::-1] if do_mirror else out

    def crop_region(self, image, rng=None) -> tuple[object, tuple[int, int, int]]:
        """The host half for a uint8 (C, H, W) image (numpy, or a tensor on the device): the
        crop region (a view, not yet mirrored) and the draws (mirror, row offset, column offset)
        with which the device half finds the mean at each pixel's uncropped position. Checks
        what ``__call__`` checks."""
        c, h, w = image.shape
        _, out_h, out_w = self.output_shape((c, h, w))
        do_mirror, h_off, w_off = self.offsets(h, w, rng)
        if self.mean is not None:
            self._check_mean(image.shape)
        elif self.mean_values.size:
            self._channel_means(c)
        view = image[:, h_off : h_off + out_h, w_off : w_off + out_w]
        return view, (int(do_mirror), h_off, w_off)

    def channel_means(self, channels: int) -> np.ndarray | None:
        """mean_value as one float32 per channel (None without mean_value)."""
        return self._channel_means(channels) if self.mean_values.size else None

    def _check_mean(self, shape) -> None:
        if tuple(self.mean.shape) != tuple(shape):
            raise LayerConfigError(
                f"the mean_file has shape {tuple(self.mean.shape)} but the image is "
                f"{tuple(shape)}; they must be equal"
            )

    def _channel_means(self, channels: int) -> np.ndarray:
        return channel_means(self.mean_values, channels)


def channel_means(mean_values: np.ndarray, channels: int) -> np.ndarray:
    """transform_param.mean_value for ``channels`` channels: one value for all, or one each."""
    if mean_values.size == 1:
        return np.repeat(mean_values, channels)
    if mean_values.size != channels:
        raise LayerConfigError(
            f"specify either 1 mean_value or as many as channels ({channels}); "
            f"got {mean_values.size}"
        )
    return mean_values
