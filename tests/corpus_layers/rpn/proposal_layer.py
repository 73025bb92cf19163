"""py-faster-rcnn's rpn.proposal_layer rewritten independently from its description (not its
code), in its style: caffe.Layer, yaml param_str_ ('feat_stride', optional 'scales'), the
phase's settings read through str(self.phase), tops reshaped in forward, an optional second top.

Anchors: a base_size square at (0, 0) reshaped to each aspect ratio at constant area (sides
rounded half to even), then scaled about its centre, ratios outer and scales inner; placed every
feat_stride pixels, rows ordered (y, x, anchor). Each is moved by its deltas (centre shift in
units of its size, log-scale of width and height, sizes counting both end pixels), clipped to
the image, dropped when a side is under RPN_MIN_SIZE * im_scale, sorted by object score,
cut to RPN_PRE_NMS_TOP_N, thinned by greedy NMS (IoU above RPN_NMS_THRESH suppresses) and cut
to RPN_POST_NMS_TOP_N.
"""

import numpy as np
import yaml

import caffe

# the part of py-faster-rcnn's fast_rcnn.config this layer reads, at that file's defaults
CFG = {
    "TRAIN": {"pre": 12000, "post": 2000, "nms": 0.7, "min_size": 16},
    "TEST": {"pre": 6000, "post": 300, "nms": 0.7, "min_size": 16},
}


def reference_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32)):
    centre = (base_size - 1) / 2.0
    out = []
    for ratio in ratios:
        width = np.round(np.sqrt(base_size * base_size / float(ratio)))
        height = np.round(width * ratio)
        for scale in scales:
            half_w, half_h = (width * scale - 1) / 2.0, (height * scale - 1) / 2.0
            out.append([centre - half_w, centre - half_h, centre + half_w, centre + half_h])
    return np.array(out, dtype=np.float64)


def apply_deltas(boxes, deltas):
    boxes = boxes.astype(deltas.dtype)
    size = boxes[:, 2:4] - boxes[:, 0:2] + 1.0
    centre = boxes[:, 0:2] + 0.5 * size
    new_centre = deltas[:, 0:2] * size + centre
    new_size = np.exp(deltas[:, 2:4]) * size
    return np.hstack([new_centre - 0.5 * new_size, new_centre + 0.5 * new_size])


def nms(boxes, threshold):
    x1, y1, x2, y2 = boxes.T
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    alive = np.arange(boxes.shape[0])
    kept = []
    while alive.size:
        best, others = alive[0], alive[1:]
        kept.append(best)
        w = np.maximum(0.0, np.minimum(x2[best], x2[others]) - np.maximum(x1[best], x1[others]) + 1)
        h = np.maximum(0.0, np.minimum(y2[best], y2[others]) - np.maximum(y1[best], y1[others]) + 1)
        inter = w * h
        alive = others[inter / (area[best] + area[others] - inter) <= threshold]
    return np.array(kept, dtype=np.int64)


class ProposalLayer(caffe.Layer):
    def setup(self, bottom, top):
        params = yaml.safe_load(self.param_str_)
        self._stride = params["feat_stride"]
        self._anchors = reference_anchors(scales=params.get("scales", (8, 16, 32)))
        top[0].reshape(1, 5)
        if len(top) > 1:
            top[1].reshape(1, 1, 1, 1)

    def reshape(self, bottom, top):
        pass  # the tops take their shape in forward

    def forward(self, bottom, top):
        assert bottom[0].data.shape[0] == 1, "one image per batch"
        cfg = CFG[str(self.phase)]
        count = self._anchors.shape[0]
        scores = bottom[0].data[:, count:]
        height, width = scores.shape[-2:]
        ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
        shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4) * self._stride
        anchors = (self._anchors[None] + shifts).reshape(-1, 4)
        deltas = bottom[1].data.transpose(0, 2, 3, 1).reshape(-1, 4)
        scores = scores.transpose(0, 2, 3, 1).reshape(-1)
        im_height, im_width, im_scale = bottom[2].data[0, :3]

        boxes = apply_deltas(anchors, deltas)
        boxes[:, 0::2] = np.clip(boxes[:, 0::2], 0, im_width - 1)
        boxes[:, 1::2] = np.clip(boxes[:, 1::2], 0, im_height - 1)
        sides = boxes[:, 2:4] - boxes[:, 0:2] + 1
        big = np.all(sides >= cfg["min_size"] * im_scale, axis=1)
        boxes, scores = boxes[big], scores[big]
        order = np.argsort(-scores, kind="stable")[: cfg["pre"]]
        boxes, scores = boxes[order], scores[order]
        kept = nms(boxes, cfg["nms"])[: cfg["post"]]
        boxes, scores = boxes[kept], scores[kept]

        rois = np.hstack([np.zeros((boxes.shape[0], 1)), boxes]).astype(np.float32)
        top[0].reshape(*rois.shape)
        top[0].data[...] = rois
        if len(top) > 1:
            top[1].reshape(scores.shape[0], 1)
            top[1].data[...] = scores.reshape(-1, 1)

    def backward(self, top, propagate_down, bottom):
        pass  # proposals pass no gradient
