"""The segmentation forks' data layers: caffe-segnet's DenseImageData and DeepLab v2's
ImageSegData, an image and a label image per record.

Like the other data layers their tops are net inputs that the loader feeds
(caffe_alex/data/segmentation.py); here they get their shapes as the forks' DataLayerSetUp
gives them: data (batch, C, H, W) and label (batch, 1, H, W), H x W the crop, else
new_height x new_width, else the first listed image's size (read with OpenCV); ImageSegData's
third top (batch, 1, 1, 2) holds each image's height and width.
"""

from __future__ import annotations

import os

from ..data.datum import ImageError, load_image
from ..data.segmentation import dense_crop, read_pairs, read_seg_lines, seg_crop
from ..errors import CaffeAlexError, LayerConfigError
from ..proto import caffe_pb2
from ..registry import register
from .data import _all_fields, _Source


class _SegSource(_Source):
    """Shared: the top shapes from the crop, the resize or the first listed image."""

    def _crop(self) -> tuple[int, int]:
        raise NotImplementedError

    def _first_image(self) -> str:
        raise NotImplementedError

    def _image_shape(self) -> tuple[int, int, int]:
        p = self.param
        c = 3 if p.is_color else 1
        crop_h, crop_w = self._crop()
        if crop_h:
            return (c, crop_h, crop_w)
        if p.new_height:
            return (c, p.new_height, p.new_width)
        if not os.path.exists(p.source):
            raise self._missing(p.source)
        try:
            first = self._first_image()
        except CaffeAlexError as exc:
            raise LayerConfigError(exc.message) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise LayerConfigError(f"cannot read list '{p.source}': {exc}") from None
        path = p.root_folder + first
        if not os.path.exists(path):
            raise self._cannot_infer(f"image '{path}' (first in '{p.source}') does not exist")
        try:  # read as the feed will read it
            _, h, w = load_image(path, bool(p.is_color)).shape
        except ImageError as exc:
            raise LayerConfigError(str(exc)) from None
        return (c, h, w)

    def _infer(self):
        c, h, w = self._image_shape()
        shapes = [(self.batch, c, h, w), (self.batch, 1, h, w), (self.batch, 1, 1, 2)]
        return shapes[: len(self.top_names)]

    def _cannot_infer(self, why: str) -> LayerConfigError:
        generic = ("(N, C, H, W)", "(N, 1, H, W)", "(N, 1, 1, 2)")
        declare = ", ".join(f"'{n}': {s}" for n, s in zip(self.top_names, generic))
        return LayerConfigError(
            f"cannot infer the shape of top '{self.top_names[0]}' because {why}; where only "
            f"shapes are needed, declare it with input_shapes={{{declare}}} in Net(...) or "
            f"--input-shape {self.top_names[0]}=N,C,H,W (time, draw, summary, export)"
        )


@register("DenseImageData")
class DenseImageDataLayer(_SegSource):
    """caffe-segnet's ``dense_image_data_param``: source (words taken in pairs: image, label
    image), root_folder, batch_size, shuffle, rand_skip, new_height/new_width, is_color,
    mirror, crop_height/crop_width; ``transform_param``: mean_file, mean_value, scale (the
    image only). The fork stops on transform_param's crop_size or mirror (its transformer
    would draw them for the image alone), and never reads dense_image_data_param.mean_file."""

    tops = (2, 2)
    own_param = "dense_image_data_param"
    source_help = "a text file of '<image path> <label image path>' pairs: docs/forks.md"
    params = {
        "dense_image_data_param": _all_fields(caffe_pb2.DenseImageDataParameter),
        "transform_param": frozenset({"scale", "mean_file", "mean_value", "crop_size", "mirror"}),
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        if self.param.HasField("mean_file"):
            raise LayerConfigError(
                "dense_image_data_param.mean_file is not read by caffe-segnet's DenseImageData; "
                "give the mean as transform_param.mean_file"
            )
        if self.transform.crop_size or self.transform.mirror:
            raise LayerConfigError(
                "DenseImageData cannot take transform_param.crop_size or mirror (the fork "
                "stops: they would move the image but not its labels); use "
                "dense_image_data_param's crop_height/crop_width and mirror"
            )
        dense_crop(self.param)

    def _crop(self):
        return dense_crop(self.param)

    def _first_image(self) -> str:
        pairs = read_pairs(self.param.source)
        if not pairs:
            raise LayerConfigError(f"list '{self.param.source}' names no image/label pair")
        return pairs[0][0]


_SEG_IMAGE_FIELDS = frozenset(
    {"source", "batch_size", "rand_skip", "shuffle", "new_height", "new_width", "is_color",
     "root_folder", "ignore_label", "label_type"}
)  # fmt: skip
_SEG_TRANSFORM_FIELDS = frozenset(
    {"scale", "mirror", "crop_size", "mean_file", "mean_value", "scale_factors", "crop_width",
     "crop_height"}
)  # fmt: skip


@register("ImageSegData")
class ImageSegDataLayer(_SegSource):
    """DeepLab v2's ``image_data_param``: source (one '<image> <label>' line per record),
    root_folder, batch_size, shuffle, rand_skip, new_height/new_width, is_color, label_type
    (PIXEL: a label image; IMAGE, the default: a class number for the whole image; NONE),
    ignore_label (255: padding and NONE's labels); ``transform_param``: crop_size or
    crop_height/crop_width, mirror, mean_value, scale, scale_factors. Up to three tops: data,
    label, and each image's (height, width); the fork makes the ones not named anonymous."""

    tops = (1, 3)
    own_param = "image_data_param"
    source_help = "a text file of '<image path> <label image path>' lines: docs/forks.md"
    params = {"image_data_param": _SEG_IMAGE_FIELDS, "transform_param": _SEG_TRANSFORM_FIELDS}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.layer_param = layer_param
        seg_crop(layer_param)

    def _crop(self):
        return seg_crop(self.layer_param)

    def _first_image(self) -> str:
        entries = read_seg_lines(self.param.source, self.param.label_type)
        if not entries:
            raise LayerConfigError(f"list '{self.param.source}' names no image")
        return entries[0][0]
