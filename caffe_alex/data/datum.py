"""Caffe's Datum record <-> numpy, and images <-> arrays as Caffe's OpenCV calls make them.

Arrays are C x H x W. A raw Datum holds uint8 ``data`` in OpenCV's BGR order (``float_data``
instead for float records); an encoded Datum holds the bytes of an image file. Images are
decoded and encoded with Pillow (RGB) and the channels reversed to BGR, so the pixels are
those OpenCV would give (JPEG decoders may differ by a grey level between libjpeg builds).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ..errors import CaffeAlexError
from ..proto import caffe_pb2

OPENCV_JPEG_QUALITY = 95  # cv::imencode's default; Pillow's own default is 75


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
        raise CaffeAlexError(f"{_where(key)} is not a Datum: {exc}") from None
    return datum


def datum_to_array(datum, key=None, force_color=False, force_gray=False) -> np.ndarray:
    """The record's pixels as C x H x W: uint8 (BGR) for data/encoded, float32 for float_data.

    Encoded images keep their own channels unless forced, as Caffe's DataTransformer
    (DecodeDatumNative, or DecodeDatumToCVMat with force_color/force_gray).
    """
    if not isinstance(datum, caffe_pb2.Datum):
        datum = parse_datum(datum, key)
    if datum.encoded:
        color = True if force_color else (False if force_gray else None)
        return decode_image(datum.data, color, what=_where(key))
    shape = (datum.channels, datum.height, datum.width)
    size = shape[0] * shape[1] * shape[2]
    if datum.data:
        if len(datum.data) != size:
            raise CaffeAlexError(
                f"{_where(key)}: {len(datum.data)} bytes of data for shape {shape}"
            )
        return np.frombuffer(datum.data, np.uint8).reshape(shape)
    if len(datum.float_data) != size:
        raise CaffeAlexError(f"{_where(key)}: {len(datum.float_data)} floats for shape {shape}")
    return np.asarray(datum.float_data, np.float32).reshape(shape)


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


def _pil_to_chw(image, color) -> np.ndarray:
    """color: True -> 3 channels, False -> 1, None -> the file's own (OpenCV's IMREAD_UNCHANGED
    for 8-bit images: grey 1, colour 3, with alpha 4)."""
    if color is None:
        color = image.mode not in ("L", "1")
        if color and ("A" in image.mode or "transparency" in image.info):
            rgba = np.asarray(image.convert("RGBA"))
            return np.ascontiguousarray(rgba[..., [2, 1, 0, 3]].transpose(2, 0, 1))
    if not color:
        return np.asarray(image.convert("L"))[None].copy()
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb[..., ::-1].transpose(2, 0, 1))


def _open(source, what: str, color):
    try:
        image = Image.open(source)
        if color is False and image.format == "JPEG":
            image.draft("L", image.size)  # decode the luma plane, as libjpeg does for OpenCV
        image.load()
    except Exception as exc:  # PIL.UnidentifiedImageError, truncated files, ...
        raise ImageError(f"cannot decode {what}: {exc}") from None
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        raise ImageError(f"cannot use {what}: {image.mode} pixels are not 8-bit")
    return image


def decode_image(data: bytes, color=None, what="encoded image") -> np.ndarray:
    """Encoded image bytes -> C x H x W uint8 BGR (see _pil_to_chw for ``color``)."""
    return _pil_to_chw(_open(io.BytesIO(data), what, color), color)


def load_image(path: str, color: bool = True, height: int = 0, width: int = 0) -> np.ndarray:
    """An image file as Caffe's ReadImageToCVMat reads it: C x H x W uint8 BGR, resized with
    OpenCV's bilinear rule when height and width are both > 0. Undecodable -> ImageError."""
    array = _pil_to_chw(_open(path, f"image '{path}'", color), color)
    if height > 0 and width > 0:
        array = resize_linear(array, height, width)
    return array


def encode_image(array: np.ndarray, fmt: str = "png") -> bytes:
    """C x H x W uint8 BGR (1 or 3 channels) -> PNG or JPEG bytes, as cv::imencode would."""
    fmt = fmt.lower()
    if array.shape[0] == 1:
        image = Image.fromarray(np.ascontiguousarray(array[0]), "L")
    else:
        image = Image.fromarray(np.ascontiguousarray(array[::-1].transpose(1, 2, 0)), "RGB")
    out = io.BytesIO()
    if fmt in ("jpg", "jpeg"):
        image.save(out, "JPEG", quality=OPENCV_JPEG_QUALITY)
    elif fmt == "png":
        image.save(out, "PNG", compress_level=1)  # OpenCV 4's default PNG compression
    else:
        raise CaffeAlexError(f"cannot encode images as '{fmt}' (png or jpg)")
    return out.getvalue()


# OpenCV's cv::resize(INTER_LINEAR) for 8-bit images, which Caffe uses to resize. Written here
# because Pillow's bilinear filter widens its kernel when shrinking (antialiasing) and so gives
# different pixels; OpenCV samples at half-pixel centres with 11-bit fixed-point weights.
_COEF_BITS = 11


def _axis_weights(src: int, dst: int):
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    i = np.floor(f).astype(np.int64)
    f = f - i.astype(np.float32)
    edge = (i < 0) | (i >= src - 1)
    f[edge] = 0
    i = np.clip(i, 0, src - 1)
    w1 = np.rint(f * np.float32(1 << _COEF_BITS)).astype(np.int32)
    w0 = np.rint((np.float32(1) - f) * np.float32(1 << _COEF_BITS)).astype(np.int32)
    return i, np.minimum(i + 1, src - 1), w0, w1


def resize_linear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """C x H x W uint8 -> C x height x width uint8, OpenCV's INTER_LINEAR (within 1 grey level
    of cv2.resize, whose SIMD and scalar paths round slightly differently)."""
    c, h, w = array.shape
    if (h, w) == (height, width):
        return array.copy()
    x0, x1, a0, a1 = _axis_weights(w, width)
    y0, y1, b0, b1 = _axis_weights(h, height)
    src = array.astype(np.int32)  # int32 holds every intermediate (at most 2^11 * 32640)
    rows = src[:, :, x0] * a0
    rows += src[:, :, x1] * a1  # C x h x width, scaled by 2^11
    rows >>= 4
    # The vertical pass as OpenCV's vectorised code rounds it (its scalar tail rounds once at
    # the end instead, which is why a few edge pixels can differ by one).
    out = rows[:, y0] * b0[:, None]
    out >>= 16
    lower = rows[:, y1] * b1[:, None]
    lower >>= 16
    out += lower
    out += 2
    out >>= 2
    return out.astype(np.uint8)  # at most (2^11 * 32640 >> 16 + 2) >> 2 = 255
