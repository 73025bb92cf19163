"""SSD's AnnotatedData layer (weiliu89/caffe, branch ``ssd``): images and their boxes from an
LMDB of AnnotatedDatum records (``caffe-alex convert-annoset`` makes one).

Like the other data layers its tops are net inputs that the loader feeds
(caffe_alex/data/annotated.py); here they get their shapes as the fork's DataLayerSetUp gives
them from the first record: data (batch, C, H, W) after resize_param and the crop; label
(1, 1, max(boxes of the first record, 1), 8) for BBOX records (the feed then gives each batch
as many rows as it has boxes), else (batch, 1, 1, 1) with each record's Datum label.
"""

from __future__ import annotations

import os

from ..data.annotated import AnnotatedTransformer, has_box_type, parse_annotated
from ..errors import CaffeAlexError, LayerConfigError
from ..proto import caffe_pb2
from ..registry import register
from .data import DEEPLAB_TRANSFORM, _all_fields, _first_value, _Source

_TRANSFORM = _all_fields(caffe_pb2.TransformationParameter) - {"noise_param"}
_TRANSFORM -= DEEPLAB_TRANSFORM  # ImageSegData's


@register("AnnotatedData")
class AnnotatedDataLayer(_Source):
    """``data_param``: source, backend, batch_size, rand_skip, prefetch;
    ``annotated_data_param``: batch_sampler, label_map_file (read by the fork's tools, not by
    the layer), anno_type; ``transform_param``: scale, mirror, crop_size, crop_h, crop_w,
    mean_file, mean_value, force_color, force_gray, resize_param (WARP,
    FIT_LARGE_SIZE_AND_PAD), distort_param, expand_param, emit_constraint. Not noise_param."""

    own_param = "data_param"
    source_help = "build it with caffe-alex convert-annoset: docs/forks.md, 'Training SSD'"
    params = {
        "data_param": _all_fields(caffe_pb2.DataParameter),
        "annotated_data_param": _all_fields(caffe_pb2.AnnotatedDataParameter),
        "transform_param": _TRANSFORM,
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.layer_param = layer_param
        self.annotated = AnnotatedTransformer(layer_param, phase)  # the configuration checks

    def _infer(self):
        source = self.param.source
        if not os.path.exists(source):
            raise self._missing(source)
        backend = caffe_pb2.DataParameter.DB.Name(self.param.backend)
        try:
            value = _first_value(source, backend)
            if value is None:
                raise LayerConfigError(f"data_param.source '{source}' holds no record")
            where = f"the first record of '{source}'"
            record = parse_annotated(value, where)
            image, raw = self.annotated.image(record.datum, where)
            h, w, c = image.shape
            chw = self.annotated.output_shape(h, w, c, raw, where)
        except LayerConfigError:
            raise
        except CaffeAlexError as exc:
            raise LayerConfigError(exc.message) from None
        except Exception as exc:  # lmdb.Error, plyvel.Error
            raise LayerConfigError(f"cannot read {backend} source '{source}': {exc}") from None
        shapes = [(self.batch, *chw)]
        if len(self.top_names) > 1:
            if has_box_type(record, self.layer_param):
                boxes = sum(len(g.annotation) for g in record.annotation_group)
                shapes.append((1, 1, max(boxes, 1), 8))
            else:
                shapes.append((self.batch, 1, 1, 1))
        return shapes

    def _cannot_infer(self, why: str) -> LayerConfigError:
        declare = f"'{self.top_names[0]}': (N, C, H, W)"
        if len(self.top_names) > 1:
            declare += f", '{self.top_names[1]}': (1, 1, 1, 8)"
        return LayerConfigError(
            f"cannot infer the shape of top '{self.top_names[0]}' because {why}; where only "
            f"shapes are needed, declare it with input_shapes={{{declare}}} in Net(...) or "
            f"--input-shape {self.top_names[0]}=N,C,H,W (time, draw, summary, export)"
        )
