"""Caffe's Datum record <-> numpy, and images <-> arrays with the OpenCV calls Caffe makes.

Arrays are C x H x W. A raw Datum holds uint8 ``data`` in OpenCV's BGR order (``float_data``
instead for float records); an encoded Datum holds the bytes of an image file. Images are read,
decoded, resized and encoded with OpenCV 4 (``cv2``), the library Caffe calls, with Caffe's
flags: ``cv::imread`` / ``cv::imdecode`` with IMREAD_COLOR (3 channels) or IMREAD_GRAYSCALE
(1) where Caffe asks for colour or grey, IMREAD_UNCHANGED (-1) for an encoded Datum's own
channels (grey 1, colour 3, with alpha 4; Caffe then refuses anything but 8-bit pixels, so 16-bit
images work only decoded in colour or grey, which OpenCV converts to 8 bits); ``cv::resize``
with INTER_LINEAR; ``cv::imencode`` with its default quality. So records and batches equal
Caffe's bit for bit wherever Caffe's OpenCV decodes with the same libjpeg and libpng (the
opencv-python wheels bundle libjpeg-turbo; another libjpeg build can differ by a grey level).

EXIF orientation: OpenCV 4 rotates a JPEG by its EXIF tag when it reads in colour or grey,
with imread and imdecode alike, and not with IMREAD_UNCHANGED. So ImageData, convert-imageset
and Datums decoded with force_color / force_gray are upright, and an encoded Datum decoded
natively keeps the stored orientation, as in Caffe built with OpenCV >= 3.1.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from ..errors import CaffeAlexError, describe
from ..proto import caffe_pb2

_READ_FLAGS = {True: cv2.IMREAD_COLOR, False: cv2.IMREAD_GRAYSCALE, None: cv2.IMREAD_UNCHANGED}


class ImageError(CaffeAlexError):
    """An image file or encoded Datum that cannot be decoded."""


def _where(key) -> str:
    if key is None:
        return "record"
    return f"record '{key.decode(errors='replace') if isinstance(key, bytes) else key}'"


def parse_datum(value: bytes, key=None) -> caffe_pb2.Datum:
    """Parse serialized Datum bytes; an error names the record's key."""
    datum = caffe_pb2.Datum()
    try:
        datum.ParseFromString(value)
    except Exception as exc:  # protobuf's DecodeError
        raise CaffeAlexError(f"{_where(key)} is not a Datum: {describe(exc)}") from None
    return datum


def datum_to_array(datum, key=None, force_color=False, force_gray=False) -> np.ndarray:
    """The record's pixels as C x H x W: uint8 (BGR) for data/encoded, float32 for float_data.

    Encoded images keep their own channels unless forced, as Caffe's DataTransformer
    (DecodeDatumNative, or DecodeDatumToCVMat with force_color/force_gray).
    """
    if not isinstance(datum, caffe_pb2.Datum):
        datum = parse_datum(datum, key)
    if datum.encoded:
        return decode_image(datum.data, color_flag(force_color, force_gray), what=_where(key))
    shape = (datum.channels, datum.height, datum.width)
    size = shape[0] * shape[1] * shape[2]
    data = datum.data  # each read of the field copies it
    if data:
        if len(data) != size:
            raise CaffeAlexError(f"{_where(key)}: {len(data)} bytes of data for shape {shape}")
        return np.frombuffer(data, np.uint8).reshape(shape)
    if len(datum.float_data) != size:
        raise CaffeAlexError(f"{_where(key)}: {len(datum.float_data)} floats for shape {shape}")
    return np.asarray(datum.float_data, np.float32).reshape(shape)


def color_flag(force_color: bool, force_gray: bool) -> bool | None:
    """transform_param's force_color / force_gray as decode_image's ``color``."""
    return True if force_color else (False if force_gray else None)


def array_to_datum(array: np.ndarray, label: int = 0) -> caffe_pb2.Datum:
    """A C x H x W array (or H x W) as a raw Datum: uint8 -> data, anything else -> float_data."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"expected a C x H x W array, got shape {array.shape}")
    c, h, w = array.shape
    datum = caffe_pb2.Datum(channels=c, height=h, width=w, label=int(label))
    if array.dtype == np.uint8:
        datum.data = np.ascontiguousarray(array).tobytes()
    else:
        datum.float_data.extend(array.astype(np.float32).ravel().tolist())
    return datum


def encoded_datum(data: bytes, label: int = 0) -> caffe_pb2.Datum:
    return caffe_pb2.Datum(data=data, label=int(label), encoded=True)


def _chw(image: np.ndarray | None, what: str) -> np.ndarray:
    """OpenCV's H x W (x C) result as C x H x W uint8; None (OpenCV could not decode) or
    deeper pixels are errors, as Caffe's CHECKs on the decoded cv::Mat."""
    if image is None:
        raise ImageError(f"cannot decode {what}")
    if image.dtype != np.uint8:
        raise ImageError(
            f"cannot use {what}: its pixels are {image.dtype} (Caffe reads 8-bit images; "
            "decoded in colour or grey, with force_color / force_gray, OpenCV converts them)"
        )
    if image.ndim == 2:
        return image[None]
    return np.ascontiguousarray(image.transpose(2, 0, 1))


def decode_image(data: bytes, color=None, what="encoded image") -> np.ndarray:
    """Encoded image bytes -> C x H x W uint8 BGR, as cv::imdecode with Caffe's flag:
    ``color`` True -> IMREAD_COLOR, False -> IMREAD_GRAYSCALE, None -> IMREAD_UNCHANGED."""
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), _READ_FLAGS[color])
    except cv2.error:  # an empty buffer, among others
        image = None
    return _chw(image, what)


def load_image(path: str, color: bool = True, height: int = 0, width: int = 0) -> np.ndarray:
    """An image file as Caffe's ReadImageToCVMat reads it: cv::imread (IMREAD_COLOR, or
    IMREAD_GRAYSCALE when ``color`` is False), then cv::resize (INTER_LINEAR) when height and
    width are both > 0. C x H x W uint8 BGR; a missing or undecodable file -> ImageError."""
    what = f"image '{path}'"
    if not os.path.isfile(path):  # checked here: imread would only log a warning
        raise ImageError(f"cannot read {what}: no such file")
    try:
        image = cv2.imread(os.fspath(path), _READ_FLAGS[color])
    except cv2.error as exc:  # e.g. more pixels than OpenCV's decompression-bomb limit
        raise ImageError(f"cannot decode {what}: {describe(exc)}") from None
    array = _chw(image, what)
    if height > 0 and width > 0:
        array = resize_linear(array, height, width)
    return array


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """C x H x W uint8 BGR (1, 3 or 4 channels) -> image file bytes (png, jpg or any other
    format OpenCV writes), as cv::imencode with its defaults (JPEG quality 95)."""
    fmt = fmt.lower().lstrip(".")
    image = array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    try:
        ok, buffer = cv2.imencode("." + fmt, image)
    except cv2.error:
        ok = False
    if not ok:
        raise CaffeAlexError(f"cannot encode images as '{fmt}' (png, jpg, bmp, ...)")
    return buffer.tobytes()


def resize_linear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """C x H x W uint8 -> C x height x width uint8 with cv::resize(INTER_LINEAR), as Caffe
    resizes (OpenCV's 11-bit fixed-point bilinear rule, half-pixel centres, no antialiasing)."""
    c = array.shape[0]
    size = (int(width), int(height))
    if c == 1:
        return cv2.resize(array[0], size, interpolation=cv2.INTER_LINEAR)[None]
    hwc = np.ascontiguousarray(array.transpose(1, 2, 0))
    out = cv2.resize(hwc, size, interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(out.reshape(height, width, c).transpose(2, 0, 1))
