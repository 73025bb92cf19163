"""pycaffe's ``caffe.io``: BlobProto and Datum <-> NumPy conversions, image loading and
resizing, 10-crop ``oversample`` and the input ``Transformer``, with pycaffe's signatures.

Built on caffe-alex's own pieces: ``tools/pycaffe_io.py`` (image loading, resizing, cropping and
the Transformer), ``formats/blobs.py`` and ``data/datum.py``. Where those differ from pycaffe
in what a caller can observe, this module follows pycaffe:

- ``blobproto_to_array`` and ``datum_to_array`` return float64 for float values (pycaffe builds
  them with ``np.array`` of the repeated field), a legacy num/channels/height/width shape wins
  over ``shape`` when any of the four is set (as in Caffe's Blob::FromProto), and a blob with
  no shape at all is a 0-d array.
- ``array_to_datum`` takes 3-D arrays only and leaves ``label`` unset unless given.
- ``Transformer.set_mean`` raises ValueError, keeps the mean's dtype, and resizes an image mean
  of another size whatever its channel count (a 1-channel mean then broadcasts over the
  input's channels); ``deprocess`` keeps the floating dtype it is given.
- ``load_image`` errors are OSErrors (as pycaffe's reader raises) as well as ImageErrors.

Beyond pycaffe, where pycaffe fails: ``blobproto_to_array`` falls back to ``double_data`` /
``double_diff`` when the float field is empty, ``datum_to_array`` decodes encoded Datums
(C x H x W uint8 BGR, as a raw Datum holds them), ``deprocess`` handles 1-channel inputs, and
``array_to_blobproto`` refuses a diff of another size. Values that do not fill their shape raise
ValueError naming both. ``resize_image`` is scikit-image's resize, as pycaffe's, where the
``pycaffe`` extra installed it; without it, NumPy order 1 as scikit-image <= 0.14 resized.
"""

from __future__ import annotations

import math

import numpy as np

from ..data import datum as _datum
from ..data.datum import ImageError
from ..formats.blobs import array_to_blob_proto
from ..proto import caffe_pb2
from ..tools import pycaffe_io as _io
from ..tools.pycaffe_io import oversample

__all__ = [
    "ImageReadError",
    "Transformer",
    "array_to_blobproto",
    "array_to_datum",
    "arraylist_to_blobprotovector_str",
    "blobproto_to_array",
    "blobprotovector_str_to_arraylist",
    "caffe_pb2",
    "datum_to_array",
    "load_image",
    "oversample",
    "resize_image",
]

_LEGACY_FIELDS = ("num", "channels", "height", "width")


# ---- BlobProto <-> arrays ---------------------------------------------------------------------
def _reshaped(values: np.ndarray, shape: tuple[int, ...], what: str) -> np.ndarray:
    # numpy's own reshape error does not say which blob field was short
    if values.size != math.prod(shape):
        raise ValueError(
            f"cannot read the blob's {what}: {values.size} values do not fill shape {shape}"
        )
    return values.reshape(shape)


def blobproto_to_array(blob: caffe_pb2.BlobProto, return_diff: bool = False) -> np.ndarray:
    """The blob's data (or its diff, with ``return_diff``) as a float64 array of its shape."""
    field = "diff" if return_diff else "data"
    values = getattr(blob, field)
    if not len(values):
        # a double-precision Caffe writes double_data / double_diff instead
        values = getattr(blob, "double_" + field)
    values = np.array(values, dtype=np.float64)
    if any(blob.HasField(name) for name in _LEGACY_FIELDS):
        shape = (blob.num, blob.channels, blob.height, blob.width)
    else:
        shape = tuple(blob.shape.dim)  # no dims at all: a 0-d array of one value
    return _reshaped(values, shape, field)


def array_to_blobproto(arr, diff=None) -> caffe_pb2.BlobProto:
    """A BlobProto with ``shape`` set to the array's (the legacy 4-D fields stay unset), its
    values as float, and ``diff``'s values too when given (flattened: only its size must
    match, as pycaffe reads it back in ``arr``'s shape)."""
    arr = np.asarray(arr)
    blob = array_to_blob_proto(arr)
    if diff is not None:
        diff = np.asarray(diff)
        if diff.size != arr.size:
            raise ValueError(f"the diff has {diff.size} values, the array {arr.size}")
        blob.diff.extend(diff.astype(np.float32).ravel().tolist())
    return blob


def arraylist_to_blobprotovector_str(arraylist) -> bytes:
    """The arrays as a serialized BlobProtoVector (data only)."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend(array_to_blobproto(arr) for arr in arraylist)
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(str) -> list[np.ndarray]:
    """The data arrays of a serialized BlobProtoVector (``str``: pycaffe's parameter name)."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(str)
    return [blobproto_to_array(blob) for blob in vec.blobs]


# ---- Datum <-> arrays ---------------------------------------------------------------------------
def array_to_datum(arr, label=None) -> caffe_pb2.Datum:
    """A C x H x W array as a raw Datum: uint8 into ``data`` bytes, any other dtype into
    ``float_data``. ``label`` is set only when given (an unset label is not serialized)."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        # pycaffe's message first, so code matching on it still matches
        raise ValueError(f"Incorrect array shape. Expected C x H x W, got {arr.shape}")
    datum = _datum.array_to_datum(arr)
    datum.ClearField("label")  # caffe-alex's helper always writes one
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum: caffe_pb2.Datum) -> np.ndarray:
    """The Datum's values as C x H x W: uint8 from ``data``, float64 from ``float_data``. The
    label is not part of it (read ``datum.label``). An encoded Datum is decoded."""
    if datum.encoded:
        return np.array(_datum.datum_to_array(datum))
    shape = (datum.channels, datum.height, datum.width)
    if len(datum.data):
        # a copy, so the array is writable as pycaffe's np.fromstring result was
        return _reshaped(np.frombuffer(datum.data, dtype=np.uint8).copy(), shape, "data")
    return _reshaped(np.array(datum.float_data, dtype=np.float64), shape, "float_data")


# ---- images -------------------------------------------------------------------------------------
class ImageReadError(ImageError, OSError):
    """An image that cannot be read: caffe-alex's ImageError, and an OSError as the IOError
    pycaffe's reader raises, so either kind of ``except`` catches it."""


def load_image(filename, color: bool = True) -> np.ndarray:
    """An image file as H x W x 3 RGB float32 in [0, 1] (H x W x 1 grey with ``color=False``),
    alpha dropped and grey repeated to 3 channels for ``color``."""
    try:
        return _io.load_image(filename, color)
    except ImageError as exc:
        raise ImageReadError(exc.message) from None


def resize_image(im, new_dims, interp_order: int = 1) -> np.ndarray:
    """An H x W x K array resized to ``new_dims`` (height, width) as float32, as pycaffe
    does: scikit-image's resize over the image stretched to [0, 1] by its own min and max
    (scipy's zoom for other than 1 or 3 channels); without scikit-image, a NumPy transcription
    of its 0.14 order-1 resize (tools/pycaffe_io.py)."""
    return _io.resize_image(im, new_dims, interp_order)


# ---- Transformer --------------------------------------------------------------------------------
class Transformer(_io.Transformer):
    """pycaffe's preprocessing of an H x W x K image into a K x H x W net input: resize to the
    input's H x W, transpose, channel swap, raw scale, mean subtraction, input scale; and
    ``deprocess`` to undo it. ``inputs`` maps input blob names to their (N, K, H, W) shapes.

    Unlike pycaffe's, ``preprocess`` never writes into the caller's array (pycaffe scales a
    float32 image in place when no step before the scaling copies it).
    """

    def set_mean(self, in_, mean) -> None:
        """The mean to subtract: K values (one per channel), or a mean image K x H x W (or
        H x W); an image of another H x W is resized to the input's."""
        self._check(in_)
        mean = np.asarray(mean)
        want = self.inputs[in_][1:]
        if mean.ndim == 1:
            if mean.shape[0] != want[0]:
                raise ValueError(
                    f"Mean channels incompatible with input: {mean.shape[0]} values for "
                    f"{want[0]} channels of '{in_}'"
                )
            mean = mean[:, None, None]
        else:
            shape = (1, *mean.shape) if mean.ndim == 2 else mean.shape
            if len(shape) != 3:
                raise ValueError(f"Mean shape invalid: {mean.shape} (want K x H x W or H x W)")
            if shape != want:
                # only H x W follows the input: the mean keeps its own channel count
                image = mean.reshape(shape).transpose(1, 2, 0)
                resized = _io.resize_image(image, want[1:]).transpose(2, 0, 1)
                dtype = mean.dtype if np.issubdtype(mean.dtype, np.floating) else np.float32
                resized = resized.astype(dtype)
                # a 2-D mean stays 2-D, as pycaffe keeps it, so deprocess' squeeze still fits
                mean = resized[0] if mean.ndim == 2 else resized
        # kept in its own dtype: subtracting a float64 mean from the float32 input computes in
        # float64 and rounds once, as pycaffe does
        self.mean[in_] = mean

    def deprocess(self, in_, data) -> np.ndarray:
        """Undo ``preprocess``: K x H x W (singleton axes squeezed away) -> H x W x K, in the
        data's floating dtype (float32 for other dtypes). A 1-channel input comes back H x W
        (pycaffe's squeeze then fails on the channel swap or transpose)."""
        self._check(in_)
        out = np.array(data).squeeze()  # np.array copies: the steps below work in place
        if not np.issubdtype(out.dtype, np.floating):
            out = out.astype(np.float32)
        ordered = in_ in self.transpose or in_ in self.channel_swap
        grey = ordered and out.ndim == 2 and self.inputs[in_][1] == 1
        if grey:
            out = out[None]  # the channel axis the steps below index
        out = self._undone(in_, out)
        if grey:
            # the channel axis went back to where the transpose took it from
            out = out.squeeze(self.transpose[in_][0] if in_ in self.transpose else 0)
        return out
