"""caffe_alex.pycaffe.io as pycaffe's caffe.io: pycaffe's own test cases (test_io.py), round
trips through BlobProto, BlobProtoVector and Datum, and the Transformer's pycaffe behaviours."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from caffe_alex.data.datum import ImageError, encode_image
from caffe_alex.proto import caffe_pb2
from caffe_alex.pycaffe import io as cio
from caffe_alex.tools import pycaffe_io

RNG = np.random.default_rng(0)


# ---- pycaffe's TestBlobProtoToArray / TestArrayToDatum --------------------------------------
def test_old_format():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([0.0] * 100)
    blob.num, blob.channels, blob.height, blob.width = 1, 1, 10, 10
    assert cio.blobproto_to_array(blob).shape == (1, 1, 10, 10)


def test_new_format():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([0.0] * 100)
    blob.shape.dim.extend([10, 10])
    assert cio.blobproto_to_array(blob).shape == (10, 10)


def test_no_shape():
    blob = caffe_pb2.BlobProto()
    blob.data.extend([0.0] * 100)
    with pytest.raises(ValueError, match="100 values"):
        cio.blobproto_to_array(blob)


def test_scalar():
    blob = caffe_pb2.BlobProto()
    blob.data.append(123.0)
    arr = cio.blobproto_to_array(blob)
    assert arr.shape == () and arr == 123


def test_label_none_size():
    with_label = cio.array_to_datum(np.ones((10, 10, 3)), label=1)
    without = cio.array_to_datum(np.ones((10, 10, 3)))
    assert len(with_label.SerializeToString()) > len(without.SerializeToString())
    assert not without.HasField("label") and with_label.label == 1


# ---- BlobProto ---------------------------------------------------------------------------------
def test_legacy_fields_win_over_shape():
    # Caffe's Blob::FromProto reads num/channels/height/width whenever one of them is set
    blob = caffe_pb2.BlobProto(num=2, channels=3)  # height and width default to 0
    blob.shape.dim.extend([6])
    blob.data.extend(range(6))
    with pytest.raises(ValueError):
        cio.blobproto_to_array(blob)  # (2, 3, 0, 0) holds no values
    blob.height = blob.width = 1
    assert cio.blobproto_to_array(blob).shape == (2, 3, 1, 1)


def test_blobproto_round_trip_with_diff():
    arr = RNG.standard_normal((2, 3, 4, 5))
    diff = RNG.standard_normal(arr.shape)
    blob = cio.array_to_blobproto(arr, diff)
    assert list(blob.shape.dim) == [2, 3, 4, 5]
    # pycaffe writes the shape only: the legacy 4-D fields stay unset
    assert not any(blob.HasField(f) for f in ("num", "channels", "height", "width"))
    data = cio.blobproto_to_array(blob)
    assert data.dtype == np.float64 and data.shape == arr.shape
    np.testing.assert_array_equal(data, arr.astype(np.float32))  # stored as float
    np.testing.assert_array_equal(
        cio.blobproto_to_array(blob, return_diff=True), diff.astype(np.float32)
    )


def test_diff_only_needs_the_same_size():
    blob = cio.array_to_blobproto(np.zeros((2, 3)), diff=np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(
        cio.blobproto_to_array(blob, return_diff=True), np.arange(6).reshape(2, 3)
    )
    with pytest.raises(ValueError, match="diff has 5 values"):
        cio.array_to_blobproto(np.zeros((2, 3)), diff=np.zeros(5))


def test_missing_diff_and_double_data():
    blob = cio.array_to_blobproto(np.ones((2, 2)))
    with pytest.raises(ValueError, match="diff"):
        cio.blobproto_to_array(blob, return_diff=True)
    # a double-precision Caffe's blob: read from double_data / double_diff
    double = caffe_pb2.BlobProto(double_data=[0.1, 0.2], double_diff=[1.5, 2.5])
    double.shape.dim.append(2)
    np.testing.assert_array_equal(cio.blobproto_to_array(double), [0.1, 0.2])
    np.testing.assert_array_equal(cio.blobproto_to_array(double, True), [1.5, 2.5])


def test_blobprotovector_round_trip():
    arrays = [
        RNG.standard_normal((1, 3, 4, 4)).astype(np.float32),
        np.arange(10, dtype=np.int32).reshape(2, 5),
        np.array(7.5),
    ]
    text = cio.arraylist_to_blobprotovector_str(arrays)
    assert isinstance(text, bytes)
    vec = caffe_pb2.BlobProtoVector.FromString(text)
    assert [list(b.shape.dim) for b in vec.blobs] == [[1, 3, 4, 4], [2, 5], []]
    back = cio.blobprotovector_str_to_arraylist(text)
    assert len(back) == 3
    for got, want in zip(back, arrays):
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, want)


# ---- Datum -------------------------------------------------------------------------------------
def test_datum_uint8_round_trip():
    arr = RNG.integers(0, 256, (3, 4, 5), dtype=np.uint8)
    datum = cio.array_to_datum(arr, label=7)
    assert (datum.channels, datum.height, datum.width, datum.label) == (3, 4, 5, 7)
    assert datum.data == arr.tobytes() and not datum.float_data
    back = cio.datum_to_array(datum)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, arr)
    back[0, 0, 0] = 1  # writable, as pycaffe's copy is


def test_datum_float_round_trip():
    arr = RNG.standard_normal((2, 3, 4))
    datum = cio.array_to_datum(arr)
    assert not datum.data and len(datum.float_data) == 24
    back = cio.datum_to_array(datum)
    assert back.dtype == np.float64 and back.shape == (2, 3, 4)
    np.testing.assert_array_equal(back, arr.astype(np.float32))
    # other integer types are not bytes: they go to float_data
    ints = cio.array_to_datum(np.arange(6, dtype=np.int64).reshape(1, 2, 3))
    assert not ints.data and list(ints.float_data) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("shape", [(10, 10), (1, 2, 3, 4), ()])
def test_datum_wants_3d(shape):
    with pytest.raises(ValueError, match="^Incorrect array shape"):
        cio.array_to_datum(np.zeros(shape, np.uint8))


def test_datum_size_mismatch_and_encoded():
    bad = caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")
    with pytest.raises(ValueError, match="3 values"):
        cio.datum_to_array(bad)
    bgr = RNG.integers(0, 256, (3, 5, 6), dtype=np.uint8)
    encoded = caffe_pb2.Datum(data=encode_image(bgr, "png"), encoded=True)
    np.testing.assert_array_equal(cio.datum_to_array(encoded), bgr)  # PNG is lossless


# ---- images ------------------------------------------------------------------------------------
def test_load_image(tmp_path):
    rgb = RNG.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((4, 6), 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    img = cio.load_image(str(tmp_path / "rgb.png"))
    assert img.dtype == np.float32 and img.shape == (4, 6, 3)
    np.testing.assert_allclose(img, rgb / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(cio.load_image(str(tmp_path / "rgba.png")), img)
    grey = cio.load_image(tmp_path / "grey.png", color=False)
    assert grey.shape == (4, 6, 1)
    assert cio.load_image(tmp_path / "grey.png").shape == (4, 6, 3)


def test_load_image_error_is_oserror_too(tmp_path):
    for exc_type in (OSError, ImageError):
        with pytest.raises(exc_type, match="missing.png"):
            cio.load_image(str(tmp_path / "missing.png"))


def test_resize_image(monkeypatch):
    monkeypatch.setattr(pycaffe_io, "_skimage", lambda: None)  # without the pycaffe extra
    im = RNG.random((4, 6, 3)).astype(np.float32)
    out = cio.resize_image(im, (8, 3))
    assert out.shape == (8, 3, 3) and out.dtype == np.float32
    assert im.min() <= out.min() and out.max() <= im.max()
    np.testing.assert_array_equal(cio.resize_image(im, (4, 6)), im)  # same size: unchanged
    flat = cio.resize_image(np.full((2, 2, 1), 0.25), (3, 5))
    assert flat.shape == (3, 5, 1) and np.all(flat == 0.25)
    with pytest.raises(NotImplementedError, match="interp_order"):
        cio.resize_image(im, (2, 2), interp_order=0)


def test_oversample_crops_by_hand():
    # 4 x 5 images, 2 x 3 crops: corners at rows {0, 2} x cols {0, 2}; the centre (2, 2.5)
    # minus half the crop (1, 1.5) gives (1, 1)
    images = np.arange(2 * 4 * 5 * 2, dtype=np.float32).reshape(2, 4, 5, 2)
    crops = cio.oversample(list(images), (2, 3))
    assert crops.shape == (20, 2, 3, 2) and crops.dtype == np.float32
    origins = [(0, 0), (0, 2), (2, 0), (2, 2), (1, 1)]
    for n, im in enumerate(images):
        for k, (y, x) in enumerate(origins):
            window = im[y : y + 2, x : x + 3]
            np.testing.assert_array_equal(crops[10 * n + k], window)
            np.testing.assert_array_equal(crops[10 * n + 5 + k], window[:, ::-1])


# ---- Transformer -------------------------------------------------------------------------------
def _imagenet_transformer(shape=(1, 3, 6, 8)):
    t = cio.Transformer({"data": shape})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255)
    return t


def test_preprocess_by_hand_and_deprocess_inverts():
    t = _imagenet_transformer()
    mean = np.array([104.00698793, 116.66876762, 122.67891434])  # float64, as from a .npy
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.5)
    img = RNG.random((6, 8, 3)).astype(np.float32)
    before = img.copy()
    out = t.preprocess("data", img)
    np.testing.assert_array_equal(img, before)  # the caller's image is left alone
    scaled = img.transpose(2, 0, 1)[::-1] * np.float32(255)
    # the float64 mean is subtracted in float64 and rounded to float32 once, as pycaffe does
    want = (scaled - mean[:, None, None]).astype(np.float32) * np.float32(0.5)
    assert out.dtype == np.float32 and out.shape == (3, 6, 8)
    np.testing.assert_array_equal(out, want)
    back = t.deprocess("data", out[None])  # a 1 x K x H x W blob: squeezed
    assert back.shape == img.shape and back.dtype == np.float32
    np.testing.assert_allclose(back, img, atol=1e-5)
    assert t.deprocess("data", out.astype(np.float64)).dtype == np.float64


def test_preprocess_resizes_to_the_input():
    t = _imagenet_transformer()
    img = RNG.random((12, 4, 3)).astype(np.float32)
    out = t.preprocess("data", img)
    assert out.shape == (3, 6, 8)
    want = cio.resize_image(img, (6, 8)).transpose(2, 0, 1)[::-1] * np.float32(255)
    np.testing.assert_array_equal(out, want)


def test_transformer_errors():
    t = cio.Transformer({"data": (1, 3, 6, 8)})
    with pytest.raises(Exception, match="'label' is not one of the net inputs"):
        t.set_raw_scale("label", 2)
    with pytest.raises(Exception, match="transpose"):
        t.set_transpose("data", (1, 0))
    with pytest.raises(Exception, match="channel swap"):
        t.set_channel_swap("data", (1, 0))
    with pytest.raises(ValueError, match="^Mean channels incompatible with input"):
        t.set_mean("data", np.zeros(4))
    for shape in [(), (1, 3, 6, 8)]:
        with pytest.raises(ValueError, match="^Mean shape invalid"):
            t.set_mean("data", np.zeros(shape))


def test_set_mean_image_rules():
    t = cio.Transformer({"data": (1, 3, 6, 8), "grey": (1, 1, 6, 8)})
    for name in t.inputs:
        t.set_transpose(name, (2, 0, 1))
    # an image mean of another size is resized to the input's H x W
    big = RNG.random((3, 12, 16)) * 100
    t.set_mean("data", big)
    want = cio.resize_image(big.transpose(1, 2, 0), (6, 8)).transpose(2, 0, 1)
    assert t.mean["data"].shape == (3, 6, 8) and t.mean["data"].dtype == np.float64
    np.testing.assert_allclose(t.mean["data"], want, rtol=1e-6)
    # pycaffe resizes H x W only: a 1-channel mean image then broadcasts over 3 channels
    t.set_mean("data", np.full((1, 3, 4), 10.0))
    assert t.mean["data"].shape == (1, 6, 8)
    out = t.preprocess("data", np.full((6, 8, 3), 30.0, np.float32))
    np.testing.assert_array_equal(out, np.full((3, 6, 8), 20.0))
    # a 2-D mean of the input's size is kept 2-D, so deprocess of a squeezed grey blob fits
    t.set_mean("grey", np.full((6, 8), 0.25))
    assert t.mean["grey"].shape == (6, 8)
    t.set_raw_scale("grey", 255)
    img = RNG.random((6, 8, 1)).astype(np.float32)
    pre = t.preprocess("grey", img)
    np.testing.assert_array_equal(pre, img.transpose(2, 0, 1) * np.float32(255) - 0.25)
    # squeezed to H x W, where pycaffe's transpose fails; the grey image comes back H x W
    np.testing.assert_allclose(t.deprocess("grey", pre[None]), img[..., 0], atol=1e-6)
    t.set_mean("grey", np.ones((3, 4)))
    assert t.mean["grey"].shape == (6, 8)


def test_mean_from_a_blobproto():
    # the usual pycaffe flow: a mean .binaryproto read with blobproto_to_array
    mean = RNG.random((1, 3, 6, 8)).astype(np.float32) * 255
    blob = caffe_pb2.BlobProto.FromString(cio.array_to_blobproto(mean).SerializeToString())
    t = _imagenet_transformer()
    t.set_mean("data", cio.blobproto_to_array(blob)[0])
    img = RNG.random((6, 8, 3)).astype(np.float32)
    want = img.transpose(2, 0, 1)[::-1] * np.float32(255) - mean[0]
    np.testing.assert_array_equal(t.preprocess("data", img), want)
