"""Data source layers: Data, ImageData, HDF5Data, MemoryData, WindowData.

Their tops are net inputs that the loader feeds; here they only declare top shapes, following
Caffe's DataLayerSetUp: data (batch, C, H, W), label (batch,). Where the shape lives in the data
(Data, ImageData, HDF5Data) the first record is read; when it cannot be, the error says how to
declare the shape with ``Net(..., input_shapes=...)``. Fields that only the loader uses (mirror,
scale, mean_file, mean_value, shuffle, rand_skip, prefetch, the window sampling options, ...)
are accepted and left to it. Legacy crop_size inside the layer's own param counts like
transform_param.crop_size (the prototxt upgrade moves it there).
"""

from __future__ import annotations

import os

import numpy as np

from ..data.datum import ImageError, color_flag, decode_image, load_image
from ..data.db import leveldb_available, open_db
from ..errors import CaffeAlexError, LayerConfigError, describe
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register

_GENERIC = ("(N, C, H, W)", "(N,)")


def _all_fields(message) -> frozenset[str]:
    return frozenset(f.name for f in message.DESCRIPTOR.fields)


# DeepLab v2's fields in BVLC messages, which only its ImageSegData reads (segmentation_data.py)
DEEPLAB_TRANSFORM = frozenset({"scale_factors", "crop_width", "crop_height"})
DEEPLAB_IMAGE_DATA = frozenset({"ignore_label", "label_type"})
_TRANSFORM = {"transform_param": _all_fields(caffe_pb2.TransformationParameter) - DEEPLAB_TRANSFORM}


def _color(transform) -> bool | None:
    """How the transformer decodes encoded images (force_color / force_gray, else as stored)."""
    if transform.force_color and transform.force_gray:
        raise LayerConfigError("transform_param: cannot set both force_color and force_gray")
    return color_flag(transform.force_color, transform.force_gray)


class _Source(CaffeLayer):
    bottoms = (0, 0)
    tops = (1, 2)
    is_source = True
    own_param = ""
    source_help = ""  # how to make the source, for the error that finds it missing

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.param = getattr(layer_param, self.own_param)
        self.transform = layer_param.transform_param
        self.top_names = list(layer_param.top)
        self.batch = int(self.param.batch_size)
        self.crop = int(self.transform.crop_size or getattr(self.param, "crop_size", 0))
        self._shapes = None

    def top_shapes(self, bottom_shapes):
        if self.batch <= 0:
            raise LayerConfigError(f"{self.own_param}.batch_size must be positive")
        if self._shapes is None:  # the data on disk is read once
            self._shapes = [tuple(s) for s in self._infer()]
        return list(self._shapes)

    def _infer(self):
        chw = self._image_shape()
        return [(self.batch, *chw), (self.batch,)][: len(self.top_names)]

    def _cannot_infer(self, why: str) -> LayerConfigError:
        declare = ", ".join(
            f"'{name}': {shape}"
            for name, shape in zip(self.top_names, _GENERIC[: len(self.top_names)], strict=True)
        )
        return LayerConfigError(
            f"cannot infer the shape of top '{self.top_names[0]}' because {why}; where only "
            f"shapes are needed, declare it with input_shapes={{{declare}}} in Net(...) or "
            f"--input-shape {self.top_names[0]}=N,C,H,W (time, draw, summary, export)"
        )

    def _missing(self, path: str) -> LayerConfigError:
        return self._cannot_infer(
            f"{self.own_param}.source '{path}' does not exist ({self.source_help})"
        )

    def _cropped(self, c: int, h: int, w: int) -> tuple[int, int, int]:
        # DataTransformer::InferBlobShape: the crop must fit inside the stored image.
        if self.crop and (h < self.crop or w < self.crop):
            raise LayerConfigError(f"crop_size {self.crop} is larger than the {h}x{w} images")
        return (c, self.crop, self.crop) if self.crop else (c, h, w)

    def forward(self):  # never called: the loader feeds these tops
        raise RuntimeError(f"{self.type_name} tops are fed by the data loader")


@register("Data")
class DataLayer(_Source):
    """``data_param``: source, backend (LEVELDB default, or LMDB), batch_size; C, H, W come from
    the first Datum (decoded with Pillow when encoded), H = W = crop_size when set."""

    own_param = "data_param"
    source_help = ("build it with caffe-alex convert-imageset or convert-mnist: docs/data.md; "
                   "the ImageNet LMDBs of models/bvlc_alexnet: docs/imagenet.md")  # fmt: skip
    params = {"data_param": _all_fields(caffe_pb2.DataParameter), **_TRANSFORM}

    def _image_shape(self):
        source = self.param.source
        if not os.path.exists(source):
            raise self._missing(source)
        datum = self._first_datum(source)
        if not datum.encoded:
            if datum.channels <= 0:
                raise LayerConfigError(f"the first Datum in '{source}' has no channels")
            return self._cropped(datum.channels, datum.height, datum.width)
        # decoded as the feed will decode it (OpenCV, Caffe's flags, EXIF applied)
        try:
            c, h, w = decode_image(datum.data, _color(self.transform), "the first Datum").shape
        except ImageError as exc:
            raise LayerConfigError(f"in '{source}': {exc}") from None
        return self._cropped(c, h, w)

    def _first_datum(self, source: str):
        backend = caffe_pb2.DataParameter.DB.Name(self.param.backend)
        try:
            value = _first_value(source, backend)
            datum = None if value is None else caffe_pb2.Datum.FromString(value)
        except LayerConfigError:
            raise
        except CaffeAlexError as exc:  # from db.py
            raise LayerConfigError(f"cannot read {backend} source: {exc.message}") from None
        except Exception as exc:  # lmdb.Error, plyvel.Error, protobuf's DecodeError
            raise LayerConfigError(
                f"cannot read {backend} source '{source}': {describe(exc)}"
            ) from None
        if datum is None:
            raise LayerConfigError(f"data_param.source '{source}' holds no record")
        return datum


def _first_value(path: str, backend: str) -> bytes | None:
    """The first record in key order, through db.py (which keeps one handle per process, so
    reading here does not clash with a loader reading the same database)."""
    if backend == "LEVELDB" and not leveldb_available():
        raise LayerConfigError(
            "reading a LEVELDB source needs the plyvel package, which is not installed "
            "(backend LEVELDB is data_param's default; set backend: LMDB for an LMDB source)"
        )
    with open_db(path, backend.lower()) as db:
        return next(iter(db), (None, None))[1]


@register("ImageData")
class ImageDataLayer(_Source):
    """``image_data_param``: source (a list of '<path> <label>' lines), root_folder, batch_size,
    new_height/new_width (both or neither), is_color (C = 3 or 1). H/W = crop_size, else
    new_height/new_width, else the size of the first listed image (read with OpenCV)."""

    tops = (2, 2)
    own_param = "image_data_param"
    source_help = "a text file of '<image path> <label>' lines: docs/data.md"
    params = {
        "image_data_param": _all_fields(caffe_pb2.ImageDataParameter) - DEEPLAB_IMAGE_DATA,
        **_TRANSFORM,
    }

    def _image_shape(self):
        p = self.param
        if (p.new_height > 0) != (p.new_width > 0):
            raise LayerConfigError("image_data_param: set new_height and new_width together")
        c = 3 if p.is_color else 1
        if self.crop:
            return (c, self.crop, self.crop)
        if p.new_height:
            return (c, p.new_height, p.new_width)
        if not os.path.exists(p.source):
            raise self._missing(p.source)
        with open(p.source) as f:
            first = f.readline().rstrip("\n")
        if not first:
            raise LayerConfigError(f"image list '{p.source}' is empty")
        path = p.root_folder + first.rsplit(" ", 1)[0]  # the label follows the last space
        if not os.path.exists(path):
            raise self._cannot_infer(f"image '{path}' (first in '{p.source}') does not exist")
        try:  # read as the feed will read it (OpenCV, Caffe's flags, EXIF applied)
            _, h, w = load_image(path, bool(p.is_color)).shape
        except ImageError as exc:
            raise LayerConfigError(str(exc)) from None
        return (c, h, w)


@register("HDF5Data")
class HDF5DataLayer(_Source):
    """``hdf5_data_param``: source (a text file listing .h5 files), batch_size, shuffle (for the
    loader). Each top reads the dataset of its name: shape (batch_size, *dataset.shape[1:])."""

    tops = (1, None)
    own_param = "hdf5_data_param"
    source_help = "a text file naming .h5 files: docs/data.md"
    params = {"hdf5_data_param": _all_fields(caffe_pb2.HDF5DataParameter)}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        if layer_param.HasField("transform_param"):
            raise LayerConfigError("HDF5Data does not transform data; remove transform_param")

    def _infer(self):
        source = self.param.source
        if not os.path.exists(source):
            raise self._missing(source)
        with open(source) as f:
            files = f.read().split()  # Caffe reads whitespace-separated names
        if not files:
            raise LayerConfigError(f"no HDF5 file is listed in '{source}'")
        if not os.path.exists(files[0]):
            raise self._cannot_infer(
                f"HDF5 file '{files[0]}' (listed in '{source}') does not exist"
            )
        try:
            import h5py  # imported on use: a heavy import most nets never need
        except ImportError:
            raise self._cannot_infer("h5py is not installed") from None
        with h5py.File(files[0], "r") as h5:
            shapes = [self._dataset_shape(h5, name, files[0]) for name in self.top_names]
        if len({s[0] for s in shapes}) > 1:
            raise LayerConfigError(f"datasets in '{files[0]}' differ in their first dimension")
        return [(self.batch, *s[1:]) for s in shapes]

    def _cannot_infer(self, why):
        shapes = ", ".join(f"'{n}': (N, ...)" for n in self.top_names)
        return LayerConfigError(
            f"cannot infer the top shapes because {why}; declare them with "
            f"input_shapes={{{shapes}}} in Net(...) or --input-shape NAME=N,... (time, draw, "
            "summary, export)"
        )

    @staticmethod
    def _dataset_shape(h5, name: str, path: str) -> tuple[int, ...]:
        if name not in h5:
            raise LayerConfigError(f"HDF5 file '{path}' has no dataset '{name}' for top '{name}'")
        shape = tuple(h5[name].shape)
        if not shape:
            raise LayerConfigError(f"dataset '{name}' in '{path}' must have at least 1 axis")
        return shape


@register("MemoryData")
class MemoryDataLayer(_Source):
    """``memory_data_param``: batch_size, channels, height, width (all required, positive)."""

    tops = (2, 2)
    own_param = "memory_data_param"
    params = {"memory_data_param": _all_fields(caffe_pb2.MemoryDataParameter), **_TRANSFORM}

    input_arrays: tuple[np.ndarray, np.ndarray] | None = None  # (data, labels), set below

    def _image_shape(self):
        p = self.param
        if min(p.channels, p.height, p.width) <= 0:
            raise LayerConfigError("memory_data_param: channels, height and width must be positive")
        return (p.channels, p.height, p.width)

    def set_input_arrays(self, data, labels) -> None:
        """The arrays this layer serves, as pycaffe's Net.set_input_arrays takes them: data
        (N, channels, height, width), labels (N,) or (N, 1, 1, 1); N a multiple of batch_size.
        The feed serves them in order, from the start again after each call (Caffe's Reset)."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        labels = np.ascontiguousarray(labels, dtype=np.float32).reshape(len(labels), -1)
        want = self._image_shape()
        if data.ndim != 4 or tuple(data.shape[1:]) != want:
            raise ValueError(f"data has shape {data.shape}; layer '{self.name}' expects "
                                 f"(N, *{want})")  # fmt: skip
        if labels.shape[1] != 1 or len(labels) != len(data):
            raise ValueError(
                f"need one label per image: {len(labels)} labels for {len(data)} images"
            )
        if len(data) == 0 or len(data) % self.batch:
            raise ValueError(
                f"the image count {len(data)} must be a multiple of batch_size {self.batch}"
            )
        self.input_arrays = (data, labels[:, 0])


@register("WindowData")
class WindowDataLayer(_Source):
    """``window_data_param``: batch_size; crop_size (transform_param's, required) gives
    (batch, 3, crop, crop). Caffe reads C from the window file, but its loader always decodes
    images in colour, so only 3 works. The other fields (source, fg/bg thresholds,
    fg_fraction, context_pad, crop_mode, cache_images, root_folder, scale) are the loader's
    (caffe_alex/data/window_source.py)."""

    tops = (2, 2)
    own_param = "window_data_param"
    params = {"window_data_param": _all_fields(caffe_pb2.WindowDataParameter), **_TRANSFORM}

    def _image_shape(self):
        # Caffe's WindowData reads transform_param.crop_size only; a V1 net's
        # window_data_param.crop_size gets there by the upgrade.
        if self.transform.crop_size <= 0:
            raise LayerConfigError(
                "WindowData needs transform_param.crop_size > 0 (Caffe does not read "
                "window_data_param.crop_size)"
            )
        return (3, self.transform.crop_size, self.transform.crop_size)
