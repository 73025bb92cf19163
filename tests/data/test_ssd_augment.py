"""SSD's augmentation pieces (data/ssd_augment.py) against arithmetic done by hand: box overlap,
coverage, projection and emit constraints, resize policies, samplers and their constraints,
the crop, expansion, resize and colour distortion of images."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from google.protobuf import text_format

from caffe_alex.data import ssd_augment as aug
from caffe_alex.proto import caffe_pb2

f32 = np.float32


def msg(cls, text=""):
    return text_format.Parse(text, cls())


def boxes(*rows):
    b = np.array(rows, f32).reshape(-1, 4)
    n = len(b)
    return aug.Boxes(np.arange(1, n + 1), np.zeros(n, np.int64), b, np.zeros(n, bool))


def test_overlaps():
    a = np.array([0, 0, 0.5, 0.5], f32)
    b = np.array([[0.25, 0.25, 0.75, 0.75], [0.5, 0.5, 1, 1], [0.6, 0, 1, 1], [0.1, 0.1, 0.2, 0.2]],
                 f32)  # fmt: skip
    np.testing.assert_allclose(aug.jaccard(a, b), [0.0625 / 0.4375, 0, 0, 0.01 / 0.25], rtol=1e-6)
    np.testing.assert_allclose(aug.coverage(a, b), [0.25, 0, 0, 0.04], rtol=1e-6)
    np.testing.assert_allclose(aug.coverage(b, a), [0.25, 0, 0, 1], rtol=1e-6)


def test_transform_boxes_projects_clips_drops_and_mirrors():
    crop = np.array([0.25, 0.25, 0.75, 0.75], f32)
    b = boxes([0.3, 0.3, 0.5, 0.6], [0.6, 0.1, 0.9, 0.4], [0.8, 0.8, 0.9, 0.9])
    out = aug.transform_boxes(b, crop)
    # the third box lies outside the crop: dropped; the second is clipped
    np.testing.assert_allclose(out.box, [[0.1, 0.1, 0.5, 0.7], [0.7, 0, 1, 0.3]], atol=1e-6)
    assert out.label.tolist() == [1, 2]
    centre = msg(caffe_pb2.EmitConstraint, "emit_type: CENTER")
    out = aug.transform_boxes(b, crop, centre, mirror=True)  # the 2nd's centre (0.75, 0.25) is on
    np.testing.assert_allclose(out.box, [[0.5, 0.1, 0.9, 0.7], [0, 0, 0.3, 0.3]], atol=1e-6)
    overlap = msg(caffe_pb2.EmitConstraint, "emit_type: MIN_OVERLAP emit_overlap: 0.5")
    out = aug.transform_boxes(b, crop, overlap)  # the 2nd box is a third inside: dropped
    assert out.label.tolist() == [1]


def test_resize_policies_move_the_boxes():
    warp = msg(caffe_pb2.ResizeParameter, "resize_mode: WARP height: 30 width: 30")
    b = np.array([[-0.1, 0.2, 0.5, 1.2]], f32)
    np.testing.assert_allclose(aug.resized_boxes(warp, 200, 100, b), [[0, 0.2, 0.5, 1]], atol=1e-6)
    pad = msg(caffe_pb2.ResizeParameter,
              "resize_mode: FIT_LARGE_SIZE_AND_PAD height: 100 width: 100")  # fmt: skip
    # a 200 x 100 image fits as 100 x 50 between bands of 25 rows
    b = np.array([[0, 0, 1, 1], [0.5, 0.5, 0.75, 1]], f32)
    np.testing.assert_allclose(aug.resized_boxes(pad, 200, 100, b),
                               [[0, 0.25, 1, 0.75], [0.5, 0.5, 0.75, 0.75]], atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(aug.resized_boxes(pad, 100, 200, b),  # tall: bands left, right
                               [[0.25, 0, 0.75, 1], [0.5, 0.5, 0.625, 1]], atol=1e-6)  # fmt: skip


def test_sampled_boxes_keep_their_scale_and_aspect():
    s = msg(caffe_pb2.Sampler, "min_scale: 0.3 max_scale: 0.9 min_aspect_ratio: 0.5 "
                               "max_aspect_ratio: 2")  # fmt: skip
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = aug.sample_box(s, rng).astype(np.float64)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 and x1 <= 1 + 1e-6 and 0 <= y0 and y1 <= 1 + 1e-6
        scale, ratio = np.sqrt(w * h), w / h
        assert 0.3 - 1e-6 <= scale <= 0.9 + 1e-6
        assert 0.5 - 1e-5 <= ratio <= 2 + 1e-5


def test_sample_constraints():
    objects = np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1]], f32)
    sample = np.array([0, 0, 0.5, 0.6], f32)  # Jaccard 0.25 / 0.30 = 0.833 with the first
    jac = lambda t: msg(caffe_pb2.SampleConstraint, t)  # noqa: E731
    assert aug.satisfies(sample, objects, jac(""))
    assert aug.satisfies(sample, objects, jac("min_jaccard_overlap: 0.8"))
    assert not aug.satisfies(sample, objects, jac("min_jaccard_overlap: 0.9"))
    assert aug.satisfies(sample, objects, jac("max_jaccard_overlap: 0.0"))  # the 2nd: 0
    assert not aug.satisfies(sample, objects[:1], jac("max_jaccard_overlap: 0.5"))
    assert aug.satisfies(sample, objects, jac("min_object_coverage: 1.0"))
    assert not aug.satisfies(sample, objects, jac("min_sample_coverage: 0.9"))  # 0.833
    # The fork's loop keeps `found` once the first kind passed: a failing second kind does not
    # undo it.
    assert aug.satisfies(sample, objects,
                         jac("min_jaccard_overlap: 0.8 min_sample_coverage: 0.9"))  # fmt: skip
    assert not aug.satisfies(sample, np.zeros((0, 4), f32), jac("min_jaccard_overlap: 0.1"))


def test_generate_samples_counts_trials_and_samples():
    bs = msg(caffe_pb2.BatchSampler,
             "sampler { min_scale: 0.3 max_scale: 1 } max_sample: 2 max_trials: 50")  # fmt: skip
    objects = np.array([[0.1, 0.1, 0.9, 0.9]], f32)
    assert len(aug.generate_samples(objects, [bs], np.random.default_rng(0))) == 2
    bs.ClearField("max_sample")
    assert len(aug.generate_samples(objects, [bs], np.random.default_rng(0))) == 50
    bs.sample_constraint.min_jaccard_overlap = 0.7
    found = aug.generate_samples(objects, [bs], np.random.default_rng(0))
    assert 0 < len(found) < 50
    assert all(aug.jaccard(s, objects)[0] >= f32(0.7) for s in found)
    bs.use_original_image = False
    assert aug.generate_samples(objects, [bs], np.random.default_rng(0)) == []


def test_crop_image_truncates_the_corners():
    image = np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3)
    out = aug.crop_image(image, np.array([0.1, 0.2, 0.6, 0.7], f32))
    np.testing.assert_array_equal(out, image[8:28, 6:36])
    out = aug.crop_image(image, np.array([-0.5, 0.5, 0.5, 2], f32))  # clipped first
    np.testing.assert_array_equal(out, image[20:40, 0:30])


class Scripted:
    """uniform(a, b) -> a + u * (b - a) for the next scripted u."""

    def __init__(self, *u):
        self.u = list(u)

    def uniform(self, a, b):
        return a + self.u.pop(0) * (b - a)


def test_expand_canvas():
    image = np.full((10, 20, 3), 200, np.uint8)
    canvas, where = aug.expand_canvas(image, 2.0, [1, 2, 3], Scripted(0.55, 0.3))
    assert canvas.shape == (20, 40, 3)
    y, x = 5, 6  # floor(0.55 * 10), floor(0.3 * 20)
    assert (canvas[y : y + 10, x : x + 20] == 200).all()
    assert (canvas[0, 0] == [1, 2, 3]).all() and (canvas[19, 39] == [1, 2, 3]).all()
    np.testing.assert_allclose(where, [-x / 20, -y / 10, (40 - x) / 20, (20 - y) / 10], rtol=1e-6)


def test_resize_image_pads_keeping_the_aspect():
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    p = msg(caffe_pb2.ResizeParameter, "resize_mode: FIT_LARGE_SIZE_AND_PAD height: 30 width: 30 "
                                       "pad_value: 7 interp_mode: NEAREST")  # fmt: skip
    out = aug.resize_image(image, p, None)
    inner = cv2.resize(image, (30, 20), interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(out[5:25], inner)
    assert (out[:5] == 7).all() and (out[25:] == 7).all()
    p = msg(caffe_pb2.ResizeParameter, "height: 10 width: 12 interp_mode: AREA")
    expected = cv2.resize(image, (12, 10), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(aug.resize_image(image, p, None), expected)


def test_distortions():
    image = np.random.default_rng(0).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    p = msg(caffe_pb2.DistortionParameter, "brightness_prob: 1 brightness_delta: 40")
    out = aug.distort_image(image, p, rng).astype(int)
    shift = out - image
    inside = (out > 0) & (out < 255)
    assert inside.any() and len(np.unique(shift[inside])) == 1 and abs(shift[inside][0]) <= 40
    p = msg(caffe_pb2.DistortionParameter, "contrast_prob: 1 contrast_lower: 0.5 "
                                           "contrast_upper: 0.5")  # fmt: skip
    out = aug.distort_image(image, p, rng)
    np.testing.assert_array_equal(out, np.rint(image.astype(f32) * f32(0.5)).astype(np.uint8))
    p = msg(caffe_pb2.DistortionParameter, "saturation_prob: 1 saturation_lower: 0 "
                                           "saturation_upper: 0")  # fmt: skip
    out = aug.distort_image(image, p, rng)  # no saturation: grey, B = G = R
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    p = msg(caffe_pb2.DistortionParameter, "random_order_prob: 1")
    out = aug.distort_image(image, p, rng)
    assert sorted(out.reshape(-1, 3).T.tolist()) == sorted(image.reshape(-1, 3).T.tolist())
    p = msg(caffe_pb2.DistortionParameter, "hue_prob: 0")
    np.testing.assert_array_equal(aug.distort_image(image, p, rng), image)


@pytest.mark.parametrize(
    "text, message",
    [("sampler { min_scale: 0 }", "min_scale must be > 0"),
     ("sampler { max_scale: 1.5 }", "max_scale must be <= 1"),
     ("sampler { min_aspect_ratio: 2 max_aspect_ratio: 1 }", "max_aspect_ratio must be >=")],
)  # fmt: skip
def test_sampler_checks(text, message):
    with pytest.raises(Exception, match=message):
        aug.check_sampler(msg(caffe_pb2.BatchSampler, text), "batch_sampler[0]")
