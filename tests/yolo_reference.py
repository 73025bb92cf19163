"""OpenCV's Region layer as a reference for the YOLOv2 port's Region.

OpenCV's Region (Darknet semantics) reads its bottom as [N, H, W, boxes, coords + 1 + classes]
(the Darknet importer permutes first) and writes decoded boxes: x = (col + sigmoid(tx)) / W,
y = (row + sigmoid(ty)) / H, w = exp(tw) * anchor_w / W, h = exp(th) * anchor_h / H, the
objectness sigmoid(to), and each class probability times the objectness (zeroed at or below
``thresh``; NMS when ``nms_threshold`` > 0). The anchors come from the layer's one blob.

The port's Region leaves x, y, w, h raw and the class probabilities unscaled, so OpenCV is run
behind a Permute to NHWC with thresh 0 and no NMS, and its output is compared with the port's
output decoded as above (``decoded_like_opencv``).
"""

from __future__ import annotations

import numpy as np
from google.protobuf import text_format

from caffe_alex.proto import caffe_pb2
from tests.reference import _blob_bytes, _field


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def decoded_like_opencv(top: np.ndarray, boxes: int, anchors: np.ndarray) -> np.ndarray:
    """The port's Region top [N, C, H, W] decoded the way OpenCV's Region writes its output:
    [N, H * W * boxes, 5 + classes]."""
    n, c, h, w = top.shape
    cells = top.astype(np.float64).reshape(n, h, w, boxes, c // boxes)
    out = np.empty_like(cells)
    cols = np.arange(w)[None, None, :, None]
    rows = np.arange(h)[None, :, None, None]
    out[..., 0] = (cols + _sigmoid(cells[..., 0])) / w
    out[..., 1] = (rows + _sigmoid(cells[..., 1])) / h
    out[..., 2] = np.exp(cells[..., 2]) * anchors[0::2] / w
    out[..., 3] = np.exp(cells[..., 3]) * anchors[1::2] / h
    out[..., 4] = cells[..., 4]
    out[..., 5:] = cells[..., 5:] * cells[..., 4:5]
    return out.reshape(n, h * w * boxes, c // boxes)


def opencv_region_text(text: str, anchors_count: int) -> str:
    """``text`` with each Region layer replaced by a Permute to NHWC and OpenCV's Region (same
    name and top), thresh 0 and no NMS; OpenCV keeps unknown region_param fields by name."""
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    layers = list(net.layer)
    del net.layer[:]
    parts = [text_format.MessageToString(net)]
    for layer in layers:
        if layer.type != "Region":
            parts.append("layer {\n" + text_format.MessageToString(layer) + "}\n")
            continue
        rp = layer.region_param
        perm = f"{layer.name}_nhwc"
        parts.append(
            f'layer {{ name: "{perm}" type: "Permute" bottom: "{layer.bottom[0]}" top: "{perm}"'
            " permute_param { order: 0 order: 2 order: 3 order: 1 } }\n"
            f'layer {{ name: "{layer.name}" type: "Region" bottom: "{perm}" top: "{layer.top[0]}"'
            f" region_param {{ classes: {rp.classes} coords: {rp.coords}"
            f" anchors: {anchors_count} softmax: {int(rp.softmax)} thresh: 0 nms_threshold: 0"
            " } }\n"
        )
    return "".join(parts)


def region_anchor_model(layer_name: str, anchors: np.ndarray) -> bytes:
    """A serialized caffemodel layer giving OpenCV's Region its anchors blob."""
    layer = caffe_pb2.LayerParameter(name=layer_name, type="Region").SerializeToString()
    blob = np.asarray(anchors, dtype=np.float32).reshape(1, -1)
    return _field(100, layer + _field(7, _blob_bytes(blob)))  # NetParameter.layer = 100
