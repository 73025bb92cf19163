"""AnnotatedData's transform of one record (data/annotated.py) with scripted random draws, so
that every output can be worked out by hand: the sampled crop, the expansion, mirror, resize
modes, crop_size, mean and scale, and the boxes after each."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from caffe_alex.data.annotated import AnnotatedTransformer, stack_box_rows
from caffe_alex.errors import CaffeAlexError, LayerConfigError
from caffe_alex.proto import caffe_pb2
from tests.data.voc import IMAGES, normalized

W, H = IMAGES[0][0], IMAGES[0][1]  # 60 x 40, three boxes


class Scripted:
    """The draws, in order: random() -> u, uniform(a, b) -> a + u (b - a), integers(n) -> k."""

    def __init__(self, *values):
        self.values = list(values)

    def _next(self):
        assert self.values, "more draws than scripted"
        return self.values.pop(0)

    def random(self):
        return self._next()

    def uniform(self, a, b):
        return a + self._next() * (b - a)

    def integers(self, n):
        k = self._next()
        assert 0 <= k < n
        return k


def record(image=None, rows=None, encoded=True):
    """An AnnotatedDatum of image 0 of tests/data/voc.py (random pixels unless given)."""
    if image is None:
        image = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    rows = normalized(0) if rows is None else rows
    r = caffe_pb2.AnnotatedDatum(type=caffe_pb2.AnnotatedDatum.BBOX)
    if encoded:
        r.datum.data = cv2.imencode(".png", image)[1].tobytes()
        r.datum.encoded = True
    else:
        r.datum.data = image.transpose(2, 0, 1).tobytes()
        r.datum.channels, r.datum.height, r.datum.width = 3, *image.shape[:2]
    for row in rows:
        group = next((g for g in r.annotation_group if g.group_label == int(row[0])), None)
        if group is None:
            group = r.annotation_group.add(group_label=int(row[0]))
        a = group.annotation.add(instance_id=int(row[1]))
        a.bbox.xmin, a.bbox.ymin, a.bbox.xmax, a.bbox.ymax = (float(v) for v in row[2:6])
        a.bbox.difficult = bool(row[6])
    return r, image


def transformer(text, phase="TRAIN"):
    lp = text_format.Parse(text, caffe_pb2.LayerParameter(name="data", type="AnnotatedData"))
    return AnnotatedTransformer(lp, phase)


def project(rows, window):
    """Boxes seen through ``window`` (x0, y0, x1, y1): shifted, scaled, clipped; those left
    without area dropped (the hand computation, in float64)."""
    x0, y0, x1, y1 = window
    out = []
    for row in rows:
        b = (row[2:6] - [x0, y0, x0, y0]) / [x1 - x0, y1 - y0, x1 - x0, y1 - y0]
        b = np.clip(b, 0, 1)
        if b[2] > b[0] and b[3] > b[1]:
            out.append([*row[:2], *b, row[6]])
    return np.array(out).reshape(-1, 7)


WARP = "resize_param { resize_mode: WARP height: 20 width: 30 }"


def test_sampled_crop_then_warp():
    t = transformer(
        "transform_param { " + WARP + " } annotated_data_param { batch_sampler { sampler { "
        "min_scale: 0.5 max_scale: 0.5 } max_trials: 1 } }"
    )
    r, image = record()
    # scale, aspect ratio, x offset (0.2 of 0.5), y offset (0.5 of 0.5), which sample
    out, boxes = t(r, Scripted(0, 0, 0.2, 0.5, 0), "rec")
    # the box (0.1, 0.25, 0.6, 0.75) is pixels x 6..36, y 10..30; 30 x 20 is the output size
    np.testing.assert_array_equal(out, image[10:30, 6:36].transpose(2, 0, 1).astype(np.float32))
    expected = project(normalized(0), (0.1, 0.25, 0.6, 0.75))
    assert len(expected) == 3
    np.testing.assert_allclose(boxes.rows(), expected, atol=1e-6)


def test_emit_constraint_drops_boxes_whose_centre_left_the_crop():
    t = transformer(
        "transform_param { " + WARP + " emit_constraint { emit_type: CENTER } } "
        "annotated_data_param { batch_sampler { sampler { min_scale: 0.5 max_scale: 0.5 } "
        "max_trials: 1 } }"
    )
    r, _ = record()
    _, boxes = t(r, Scripted(0, 0, 0.2, 0.5, 0), "rec")
    expected = project(normalized(0), (0.1, 0.25, 0.6, 0.75))
    np.testing.assert_allclose(boxes.rows(), expected[[0, 1]], atol=1e-6)  # the cars; the bus
    # (centre x 0.75) is gone, though it overlaps the crop


def test_expansion_onto_the_mean_then_warp_and_mirror():
    t = transformer(
        "transform_param { mirror: true mean_value: 104 mean_value: 117 mean_value: 123.5 "
        "scale: 0.5 " + WARP + " expand_param { prob: 1 max_expand_ratio: 2 } }"
    )
    r, image = record()
    # expand? (0.3 <= 1), ratio 1 + 0.5, y 0.5 of 20, x 0.25 of 30, then the mirror coin
    out, boxes = t(r, Scripted(0.3, 0.5, 0.5, 0.25, 1), "rec")
    canvas = np.empty((60, 90, 3), np.uint8)
    canvas[:] = [104, 117, 124]  # 123.5 rounds to even
    canvas[10:50, 7:67] = image
    mean = np.array([104, 117, 123.5], np.float32)[:, None, None]
    pixels = cv2.resize(canvas, (30, 20)).transpose(2, 0, 1)[:, :, ::-1]
    np.testing.assert_array_equal(out, (pixels - mean) * np.float32(0.5))
    expected = project(normalized(0), (-7 / 60, -10 / 40, 83 / 60, 50 / 40))
    expected[:, [2, 4]] = 1 - expected[:, [4, 2]]
    np.testing.assert_allclose(boxes.rows(), expected, atol=1e-6)


def test_fit_large_size_and_pad_moves_boxes_between_the_bands():
    t = transformer("transform_param { resize_param { resize_mode: FIT_LARGE_SIZE_AND_PAD "
                    "height: 30 width: 30 pad_value: 9 } }", "TEST")  # fmt: skip
    r, image = record()
    out, boxes = t(r, None, "rec")
    inner = cv2.resize(image, (30, 20)).transpose(2, 0, 1)
    np.testing.assert_array_equal(out[:, 5:25], inner)
    assert (out[:, :5] == 9).all() and (out[:, 25:] == 9).all()
    expected = normalized(0).astype(np.float64)
    expected[:, [3, 5]] = (5 + expected[:, [3, 5]] * 20) / 30
    np.testing.assert_allclose(boxes.rows(), expected, atol=1e-6)


def test_crop_size_test_phase_takes_the_centre():
    t = transformer("transform_param { crop_size: 20 }", "TEST")
    r, image = record()
    out, boxes = t(r, None, "rec")
    np.testing.assert_array_equal(out, image[10:30, 20:40].transpose(2, 0, 1))
    np.testing.assert_allclose(boxes.rows(), project(normalized(0), (1 / 3, 0.25, 2 / 3, 0.75)),
                               atol=1e-6)  # fmt: skip


def test_crop_size_train_draws_rows_then_columns():
    t = transformer("transform_param { crop_size: 20 }")
    r, image = record()
    out, _ = t(r, Scripted(3, 11), "rec")
    np.testing.assert_array_equal(out, image[3:23, 11:31].transpose(2, 0, 1))


def test_raw_records():
    t = transformer("transform_param { mirror: true expand_param { max_expand_ratio: 1.5 } }")
    r, image = record(encoded=False)
    out, boxes = t(r, Scripted(0.5, 0.5, 0, 0, 0), "rec")  # expand 1.25: 50 x 75, at 0, 0
    assert out.shape == (3, 50, 75)
    assert (out[:, :40, :60] == image.transpose(2, 0, 1)).all()
    assert (out[:, 40:] == 32).all()  # the fork's ' ' bytes
    t = transformer("transform_param { " + WARP + " }")
    with pytest.raises(CaffeAlexError, match="rec is a raw .* resizes only encoded"):
        t(r, None, "rec")


@pytest.mark.parametrize(
    "text, message",
    [
        ("transform_param { resize_param { resize_mode: FIT_SMALL_SIZE height: 3 width: 3 } }",
         "FIT_SMALL_SIZE is not supported"),
        ("transform_param { resize_param { height: 0 width: 3 } }", "height and width must be"),
        ("transform_param { expand_param { max_expand_ratio: 1 } }", "max_expand_ratio must be"),
        ("transform_param { crop_h: 3 }", "set crop_h and crop_w together"),
        ("annotated_data_param { batch_sampler { sampler { min_scale: 0 } } }",
         r"batch_sampler\[0\].sampler: min_scale must be > 0"),
        ("transform_param { distort_param { contrast_prob: 1 contrast_lower: 2 "
         "contrast_upper: 1 } }", "contrast_upper must be >= contrast_lower"),
    ],
)  # fmt: skip
def test_configuration_errors(text, message):
    with pytest.raises(LayerConfigError, match=message):
        transformer(text)


def test_a_batch_without_boxes_gives_one_row_of_minus_ones():
    rows = [np.zeros((0, 7), np.float32), np.ones((2, 7), np.float32)]
    stacked = stack_box_rows(rows)
    assert stacked.shape == (1, 1, 2, 8) and (stacked[0, 0, :, 0] == 1).all()
    empty = stack_box_rows([np.zeros((0, 7), np.float32)] * 3)
    assert empty.shape == (1, 1, 1, 8) and (empty == -1).all()
