"""caffe_alex.tools.deploy and ``caffe-alex deploy`` against a NumPy transcription of pycaffe.

The reference below restates python/caffe/io.py (Transformer.preprocess, resize_image with the
skimage of Caffe's time, oversample) and classifier.py's centre crop, pixel by pixel and loop
by loop, independently of the vectorised code under test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from caffe_alex.cli import main
from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from caffe_alex.tools import pycaffe_io
from caffe_alex.tools.deploy import Classifier, class_names, output_task
from caffe_alex.tools.pycaffe_io import (
    Transformer,
    center_crop,
    load_image,
    oversample,
    resize_image,
)
from tests.reference import parse_net


@pytest.fixture(autouse=True)
def _numpy_resize(monkeypatch):
    """The references here restate scikit-image <= 0.14's resize: the NumPy path runs, as
    without the pycaffe extra (tests/tools/test_pycaffe_io.py checks scikit-image's)."""
    monkeypatch.setattr(pycaffe_io, "_skimage", lambda: None)

# ---- the reference: pycaffe's steps, transcribed ---------------------------------------------


def ref_skimage_resize(im, dims):
    """skimage.transform.resize(order=1, mode='constant', cval=0) of an image in [0, 1], as in
    skimage <= 0.14: the output pixel (r, c) samples the input at ((r+.5)*sy-.5, (c+.5)*sx-.5)
    bilinearly, out-of-range neighbours being cval; the result is clipped to [0, 1]."""
    H, W, K = im.shape
    out = np.zeros((dims[0], dims[1], K))
    sy, sx = H / dims[0], W / dims[1]

    def pixel(r, c):
        return im[r, c] if 0 <= r < H and 0 <= c < W else np.zeros(K)

    for r in range(dims[0]):
        for c in range(dims[1]):
            y, x = (r + 0.5) * sy - 0.5, (c + 0.5) * sx - 0.5
            y0, x0 = math.floor(y), math.floor(x)
            dy, dx = y - y0, x - x0
            out[r, c] = (
                pixel(y0, x0) * (1 - dy) * (1 - dx)
                + pixel(y0, x0 + 1) * (1 - dy) * dx
                + pixel(y0 + 1, x0) * dy * (1 - dx)
                + pixel(y0 + 1, x0 + 1) * dy * dx
            )
    return np.clip(out, 0, 1)


def ref_resize_image(im, dims):
    lo, hi = im.min(), im.max()
    if hi <= lo:
        return np.full((dims[0], dims[1], im.shape[-1]), lo, np.float32)
    std = (im.astype(np.float64) - lo) / (hi - lo)
    return (ref_skimage_resize(std, dims) * (hi - lo) + lo).astype(np.float32)


def ref_preprocess(data, in_dims, transpose, swap, raw_scale, mean, input_scale):
    x = data.astype(np.float32)
    if x.shape[:2] != tuple(in_dims):
        x = ref_resize_image(x, in_dims)
    x = x.transpose(transpose)
    if swap is not None:
        x = x[swap, :, :]
    if raw_scale is not None:
        x = x * raw_scale
    if mean is not None:
        x = x - mean
    if input_scale is not None:
        x = x * input_scale
    return x


def ref_oversample(images, crop_dims):
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    centre = im_shape[:2] / 2.0
    boxes = []
    for i in (0, im_shape[0] - crop_dims[0]):
        for j in (0, im_shape[1] - crop_dims[1]):
            boxes.append((i, j, i + crop_dims[0], j + crop_dims[1]))
    c = np.concatenate([centre - crop_dims / 2.0, centre + crop_dims / 2.0])
    boxes.append(tuple(int(v) for v in c))
    crops = []
    for im in images:
        these = [im[a:c, b:d, :] for a, b, c, d in boxes]
        crops += these + [t[:, ::-1, :] for t in these]
    return np.array(crops, dtype=np.float32)


def ref_center_crop(images, crop_dims):
    centre = np.array(images.shape[1:3]) / 2.0
    half = np.array(crop_dims) / 2.0
    a, b, c, d = np.concatenate([centre - half, centre + half]).astype(int)
    return images[:, a:c, b:d, :]


# ---- preprocessing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, dims",
    [((13, 9, 3), (7, 5)), ((5, 6, 3), (11, 8)), ((9, 9, 1), (9, 9)), ((4, 17, 3), (9, 6))],
)
def test_resize_image_matches_pycaffe(shape, dims):
    im = np.random.default_rng(1).uniform(0.2, 0.9, shape).astype(np.float32)
    np.testing.assert_allclose(resize_image(im, dims), ref_resize_image(im, dims), atol=2e-6)


def test_resize_of_a_constant_image_fills():
    out = resize_image(np.full((4, 5, 3), 0.25, np.float32), (6, 7))
    assert out.shape == (6, 7, 3) and np.all(out == np.float32(0.25))


@pytest.mark.parametrize("resize", [False, True])
def test_preprocess_matches_pycaffe(resize):
    rng = np.random.default_rng(2)
    data = rng.uniform(0, 1, (12, 10, 3) if resize else (6, 5, 3)).astype(np.float32)
    mean = rng.uniform(50, 150, 3).astype(np.float32)
    t = Transformer({"data": (1, 3, 6, 5)})
    t.set_transpose("data", (2, 0, 1))
    t.set_channel_swap("data", (2, 1, 0))
    t.set_raw_scale("data", 255.0)
    t.set_mean("data", mean)
    t.set_input_scale("data", 0.017)
    ours = t.preprocess("data", data)
    ref = ref_preprocess(data, (6, 5), (2, 0, 1), [2, 1, 0], 255.0, mean[:, None, None], 0.017)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(t.deprocess("data", ours), ref_resize_image(data, (6, 5)) if
                               resize else data, atol=1e-5)  # fmt: skip


def test_mean_image_of_another_size_is_resized_as_pycaffe():
    mean = np.random.default_rng(3).uniform(90, 130, (3, 9, 8)).astype(np.float32)
    t = Transformer({"data": (1, 3, 5, 4)})
    t.set_mean("data", mean)
    lo, hi = mean.min(), mean.max()
    want = ref_resize_image(((mean - lo) / (hi - lo)).transpose(1, 2, 0), (5, 4))
    want = want.transpose(2, 0, 1) * (hi - lo) + lo
    np.testing.assert_allclose(t.mean["data"], want, rtol=1e-5)
    with pytest.raises(Exception, match="channels"):
        t.set_mean("data", np.zeros(4))


@pytest.mark.parametrize("image, crop", [((10, 12), (7, 7)), ((9, 11), (6, 5)), ((8, 8), (8, 8))])
def test_oversample_and_centre_crop_match_pycaffe(image, crop):
    images = np.random.default_rng(4).random((2, *image, 3)).astype(np.float32)
    ours = oversample(images, crop)
    assert ours.shape == (20, *crop, 3)
    np.testing.assert_array_equal(ours, ref_oversample(images, crop))
    np.testing.assert_array_equal(center_crop(images, crop), ref_center_crop(images, crop))


def test_load_image_modes(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, (6, 7, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    alpha = np.concatenate([rgb, np.full((6, 7, 1), 9, np.uint8)], axis=2)
    Image.fromarray(alpha, "RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(load_image(tmp_path / "c.png"), rgb / 255.0, atol=1e-7)
    np.testing.assert_allclose(load_image(tmp_path / "a.png"), rgb / 255.0, atol=1e-7)
    grey = load_image(tmp_path / "g.png")
    assert grey.shape == (6, 7, 3) and np.all(grey[..., 0] == grey[..., 2])
    assert load_image(tmp_path / "g.png", color=False).shape == (6, 7, 1)
    luma = rgb @ np.array([0.2125, 0.7154, 0.0721]) / 255.0  # skimage's rgb2gray
    np.testing.assert_allclose(load_image(tmp_path / "c.png", False)[..., 0], luma, atol=1e-6)


# ---- a net whose answer is known: class = the strongest BGR channel of the mean colour --------

COLOUR_NET = """
name: "colour"
layer { name: "data" type: "Input" top: "data"
        input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 3 } }
layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }
"""
MEAN = np.array([104.0, 117.0, 123.0], np.float32)
SCALE = 0.05  # fc = SCALE * (B, G, R channel means)


def colour_net() -> Net:
    net = Net(parse_net(COLOUR_NET), "TEST")
    weight, bias = net.params["fc"]
    weight.data.copy_(SCALE * torch.eye(3))
    bias.data.zero_()
    return net


def expected_probs(images, dims, over: bool) -> np.ndarray:
    """Softmax of SCALE x per-crop BGR means, the crops made by the reference transcription."""
    resized = np.stack([ref_resize_image(im, dims) for im in images])
    crops = ref_oversample(resized, (6, 6)) if over else ref_center_crop(resized, (6, 6))
    x = np.stack([ref_preprocess(c, (6, 6), (2, 0, 1), [2, 1, 0], 255.0, MEAN[:, None, None],
                                 None) for c in crops])  # fmt: skip
    logits = SCALE * x.mean(axis=(2, 3)).astype(np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return p.reshape(len(images), 10, 3).mean(1) if over else p


def coloured(rgb, shape=(9, 11), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.array(rgb) / 255.0 + rng.normal(0, 0.05, (*shape, 3)), 0, 1).astype(
        np.float32
    )


@pytest.mark.parametrize("over", [False, True])
def test_classifier_predicts_the_dominant_channel(over):
    clf = Classifier(colour_net(), image_dims=(8, 9), mean=MEAN, raw_scale=255.0,
                     channel_swap=(2, 1, 0))  # fmt: skip
    images = [coloured((250, 40, 30), (9, 11)), coloured((20, 230, 60), (7, 13), 1),
              coloured((30, 20, 240), (12, 8), 2)]  # fmt: skip
    assert clf.prepare(images, oversample=over).shape == ((30 if over else 3), 3, 6, 6)
    probs = clf.predict(images, oversample=over)
    np.testing.assert_allclose(probs, expected_probs(images, (8, 9), over), rtol=1e-5)
    assert list(probs.argmax(1)) == [2, 1, 0]  # red, green, blue in BGR order


# ---- the command ----------------------------------------------------------------------------


@pytest.fixture
def colour_files(tmp_path):
    net = colour_net()
    (tmp_path / "deploy.prototxt").write_text(COLOUR_NET)
    net.save_weights(tmp_path / "w.caffemodel")
    (tmp_path / "labels.txt").write_text("b blue\ng green\nr red\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name, rgb in [("1red", (240, 30, 20)), ("2green", (20, 220, 30)), ("3blue", (10, 40, 250)),
                      ("4red", (230, 50, 60))]:  # fmt: skip
        Image.fromarray((coloured(rgb) * 255).astype(np.uint8)).save(folder / f"{name}.png")
    (folder / "2bad.png").write_bytes(b"this is not an image")
    (folder / "notes.txt").write_text("ignored: not an image extension")
    more = tmp_path / "more"
    more.mkdir()
    Image.fromarray((coloured((20, 250, 10)) * 255).astype(np.uint8)).save(more / "g.jpg")
    return tmp_path


def run_deploy(folder, *args):
    base = ["deploy", "--model", str(folder / "deploy.prototxt"), "-weights",
            str(folder / "w.caffemodel"), "--mean-values", "104,117,123", "--labels",
            str(folder / "labels.txt"), "--image-dims", "8,8", "--top", "2"]  # fmt: skip
    return CliRunner().invoke(main, base + list(args))


def test_deploy_folders_globs_and_bad_files(colour_files):
    result = run_deploy(colour_files, "--batch-size", "2", "--format", "json",
                        str(colour_files / "imgs"), str(colour_files / "more" / "*.jpg"),
                        str(colour_files / "missing.png"))  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    labels = {d["image"].rsplit("/", 1)[1]: d["top"][0]["label"] for d in doc}
    assert labels == {"1red.png": "r red", "2green.png": "g green", "3blue.png": "b blue",
                      "4red.png": "r red", "g.jpg": "g green"}  # fmt: skip
    assert all(len(d["top"]) == 2 and d["top"][0]["probability"] > d["top"][1]["probability"]
               for d in doc)  # fmt: skip
    errors = [line for line in result.stderr.splitlines() if "skipped '" in line]
    assert len(errors) == 2
    assert "2bad.png" in errors[0] and "missing.png" in errors[1]
    assert "2 input(s) skipped, 5 classified" in result.stderr


def test_deploy_oversample_table_and_csv(colour_files):
    images = colour_files / "imgs" / "1red.png"
    table = run_deploy(colour_files, "--oversample", str(images))
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert lines[0].endswith("1red.png") and lines[1].split()[-2:] == ["r", "red"]
    img = load_image(images)
    p = expected_probs([img], (8, 8), over=True)[0]
    assert float(lines[1].split()[1]) == pytest.approx(p.max(), abs=1e-4)
    csv_out = run_deploy(colour_files, "--format", "csv", str(images))
    assert csv_out.stdout.splitlines()[0] == "image,rank,index,label,probability"
    assert csv_out.stdout.splitlines()[1].split(",")[1:4] == ["1", "2", "r red"]


def test_deploy_with_nothing_readable_fails(colour_files):
    result = run_deploy(colour_files, str(colour_files / "imgs" / "2bad.png"))
    assert result.exit_code == 1
    assert "no image could be classified" in result.stderr


# ---- labels files ---------------------------------------------------------------------------

LABELMAP = """# SSD's labelmap_voc.prototxt, shortened
item {
  name: "none_of_the_above"
  label: 0
  display_name: "background"
}
item { name: "aeroplane" label: 1 display_name: "aeroplane" }
item { name: "n02084071" label: 12 }
"""


def test_class_names_from_lines_and_labelmaps(tmp_path):
    (tmp_path / "voc.txt").write_text("background\naeroplane\n\nbicycle\n")
    assert class_names(tmp_path / "voc.txt") == {0: "background", 1: "aeroplane", 2: "bicycle"}
    (tmp_path / "labelmap.prototxt").write_text(LABELMAP)
    assert class_names(tmp_path / "labelmap.prototxt") == {0: "background", 1: "aeroplane",
                                                           12: "n02084071"}  # fmt: skip
    (tmp_path / "bad.prototxt").write_text("item { name: 'x' label: one }")
    with pytest.raises(CaffeAlexError, match=r"bad.prototxt: not a labelmap prototxt: 1:"):
        class_names(tmp_path / "bad.prototxt")
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CaffeAlexError, match="binary.txt: not a text file"):
        class_names(tmp_path / "binary.txt")
    with pytest.raises(CaffeAlexError, match="no such file"):
        class_names(tmp_path / "missing.txt")


def test_output_task_by_shape_and_by_request():
    pooled = Net(parse_net(COLOUR_NET.replace("global_pooling: true", "kernel_size: 2")))
    assert output_task(pooled) == ("classify", "prob")  # InnerProduct flattens: N x 3
    conv = Net(parse_net(COLOUR_NET.split('layer { name: "fc"')[0]), "TEST")
    assert output_task(colour_net()) == ("classify", "prob")
    assert output_task(conv) == ("classify", "pool")  # N x 3 x 1 x 1: one value per class
    local = Net(parse_net(COLOUR_NET.split('layer { name: "fc"')[0].replace(
        "global_pooling: true", "kernel_size: 2")), "TEST")  # fmt: skip
    assert output_task(local) == ("segment", "pool")  # N x 3 x 5 x 5
    assert output_task(local, "classify") == ("classify", "pool")
    with pytest.raises(CaffeAlexError, match=r"--task detect: output 'pool' has shape \[2, 3, 5"):
        output_task(local, "detect")
    with pytest.raises(CaffeAlexError, match=r"--task segment: output 'prob' has shape \[2, 3\]"):
        output_task(colour_net(), "segment")
