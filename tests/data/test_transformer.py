"""DataTransformer against a loop-by-loop NumPy transcription of Caffe's Transform(Datum)."""

from __future__ import annotations

import numpy as np
import pytest

from caffe_alex.data.transformer import DataTransformer
from caffe_alex.errors import LayerConfigError
from caffe_alex.formats.blobs import array_to_blob_proto
from caffe_alex.proto import caffe_pb2


def caffe_transform(image, param, phase, rng, mean=None):
    """Caffe's DataTransformer::Transform(const Datum&, Dtype*), index by index; ``mean`` is
    the mean_file's image."""
    c, h, w = image.shape
    crop, scale = param.crop_size, np.float32(param.scale)
    values = list(param.mean_value)
    if len(values) == 1:
        values *= c
    do_mirror = param.mirror and rng.integers(2)
    height, width, h_off, w_off = h, w, 0, 0
    if crop:
        height = width = crop
        if phase == "TRAIN":
            h_off, w_off = rng.integers(h - crop + 1), rng.integers(w - crop + 1)
        else:
            h_off, w_off = (h - crop) // 2, (w - crop) // 2
    flat, out = image.ravel(), np.zeros(c * height * width, np.float32)
    for ch in range(c):
        for y in range(height):
            for x in range(width):
                data_index = (ch * h + h_off + y) * w + w_off + x
                top_x = width - 1 - x if do_mirror else x
                top_index = (ch * height + y) * width + top_x
                pixel = np.float32(flat[data_index])
                if mean is not None:
                    out[top_index] = (pixel - mean.ravel()[data_index]) * scale
                elif values:
                    out[top_index] = (pixel - np.float32(values[ch])) * scale
                else:
                    out[top_index] = pixel * scale
    return out.reshape(c, height, width)


def make_param(tmp_path, crop=0, mirror=False, scale=1.0, mean=None, shape=(3, 7, 9)):
    param = caffe_pb2.TransformationParameter(crop_size=crop, mirror=mirror, scale=scale)
    array = None
    if mean == "file":
        array = np.random.default_rng(5).uniform(0, 255, (1, *shape)).astype(np.float32)
        path = tmp_path / "mean.binaryproto"
        path.write_bytes(array_to_blob_proto(array).SerializeToString())
        param.mean_file, array = str(path), array[0]
    elif mean is not None:
        param.mean_value.extend(mean)
    return param, array


@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize(
    "crop,mirror,scale,mean",
    [
        (0, False, 1.0, None),
        (5, False, 1.0, None),
        (5, True, 0.00390625, "file"),
        (4, True, 0.5, [104.0]),
        (0, True, 2.0, [104.0, 117.0, 123.0]),
        (7, False, 0.017, "file"),
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_matches_caffe(tmp_path, phase, crop, mirror, scale, mean, dtype):
    param, mean_image = make_param(tmp_path, crop, mirror, scale, mean)
    transformer = DataTransformer(param, phase)
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 7, 9)).astype(dtype)
    for i, image in enumerate(images):
        ours = transformer(image, np.random.default_rng(i))
        want = caffe_transform(image, param, phase, np.random.default_rng(i), mean_image)
        np.testing.assert_array_equal(ours, want)


def offsets_seen(transformer, n=400):
    seen = set()
    for i in range(n):
        seen.add(transformer.offsets(7, 9, np.random.default_rng(i)))
    return seen


def test_train_crops_everywhere_and_mirrors_both_ways():
    param = caffe_pb2.TransformationParameter(crop_size=5, mirror=True)
    seen = offsets_seen(DataTransformer(param, "TRAIN"))
    assert {(m, h, w) for m in (False, True) for h in range(3) for w in range(5)} == seen


def test_test_phase_crops_the_centre_and_still_mirrors_like_caffe():
    # Caffe's transformer draws the mirror coin whenever mirror is set, in TEST too.
    param = caffe_pb2.TransformationParameter(crop_size=5, mirror=True)
    assert offsets_seen(DataTransformer(param, "TEST")) == {(False, 1, 2), (True, 1, 2)}
    plain = DataTransformer(caffe_pb2.TransformationParameter(crop_size=4), "TEST")
    assert not plain.needs_rng and plain.offsets(7, 9, None) == (False, 1, 2)


def test_mean_file_crop_region_is_subtracted_before_the_mirror(tmp_path):
    param, mean = make_param(tmp_path, crop=5, mirror=True, mean="file")
    image = np.full((3, 7, 9), 200, np.uint8)
    transformer = DataTransformer(param, "TRAIN")
    for seed in range(20):
        mirror, h, w = transformer.offsets(7, 9, np.random.default_rng(seed))
        want = 200 - mean[:, h : h + 5, w : w + 5]
        got = transformer(image, np.random.default_rng(seed))
        np.testing.assert_array_equal(got, want[:, :, ::-1] if mirror else want)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"mean_file": "m.binaryproto", "mean_value": [1.0]}, "mean_file and mean_value"),
        ({"force_color": True, "force_gray": True}, "force_color and force_gray"),
        ({"mean_file": "/no/such/mean.binaryproto"}, "cannot read mean_file"),
    ],
)
def test_bad_parameters(fields, message):
    with pytest.raises(LayerConfigError, match=message):
        DataTransformer(caffe_pb2.TransformationParameter(**fields), "TRAIN")


def test_bad_images(tmp_path):
    two = DataTransformer(caffe_pb2.TransformationParameter(mean_value=[1, 2]), "TEST")
    with pytest.raises(LayerConfigError, match="1 mean_value or as many as channels"):
        two(np.zeros((3, 4, 4), np.uint8))
    crop = DataTransformer(caffe_pb2.TransformationParameter(crop_size=5), "TEST")
    with pytest.raises(LayerConfigError, match="crop_size 5 is larger than the 4x6 image"):
        crop(np.zeros((3, 4, 6), np.uint8))
    param, _ = make_param(tmp_path, mean="file", shape=(3, 7, 9))
    with pytest.raises(LayerConfigError, match=r"mean_file has shape \(3, 7, 9\).*\(3, 8, 9\)"):
        DataTransformer(param, "TEST")(np.zeros((3, 8, 9), np.uint8))
