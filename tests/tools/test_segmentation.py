"""caffe_alex.tools.segmentation: label maps, the VOC colour map, the overlay, and FCN-8s (the
real deploy net from the corpus, random weights) end to end through the deploy steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from caffe_alex.net import Net
from caffe_alex.tools.deploy import Classifier, output_task
from caffe_alex.tools.segmentation import (
    class_shares,
    label_map,
    overlay,
    segment_files,
    voc_palette,
)
from tests.corpus import CORPUS
from tests.tools.test_deploy import ref_preprocess

FCN8S = CORPUS / "shelhamer__fcn.berkeleyvision.org" / "voc-fcn8s" / "deploy.prototxt"
FCN_MEAN = np.array([104.00698793, 116.66876762, 122.67891434], np.float32)  # infer.py's


def ref_voc_colormap(n):
    """The PASCAL VOC devkit's labelcolormap, transcribed: per class, three bits at a time
    of its number go to r, g, b, filling each from bit 7 down."""
    cmap = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap.append((r, g, b))
    return np.array(cmap, np.uint8)


def ref_label_map(scores, height, width):
    """argmax over classes, then each image pixel takes the score pixel its centre lies in."""
    C, h, w = scores.shape
    out = np.zeros((height, width), np.int64)
    for y in range(height):
        for x in range(width):
            sy = min(int((y + 0.5) * h / height), h - 1)
            sx = min(int((x + 0.5) * w / width), w - 1)
            column = [scores[c, sy, sx] for c in range(C)]
            out[y, x] = column.index(max(column))  # first of equal maxima
    return out


def test_voc_palette_is_the_devkit_colormap():
    np.testing.assert_array_equal(voc_palette(300), ref_voc_colormap(300))
    assert voc_palette(3).tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0]]


@pytest.mark.parametrize("classes, net_hw, image_hw", [(5, (4, 6), (9, 13)), (3, (7, 5), (3, 2)),
                                                       (300, (3, 3), (5, 4))])  # fmt: skip
def test_label_map_is_argmax_resized_by_nearest(classes, net_hw, image_hw):
    scores = np.random.default_rng(classes).standard_normal((classes, *net_hw)).astype(np.float32)
    scores[:, 0, 0] = 1.0  # a tie: the lower class wins
    got = label_map(scores, image_hw)
    assert got.shape == image_hw
    assert got.dtype == (np.uint16 if classes > 256 else np.uint8)
    np.testing.assert_array_equal(got, ref_label_map(scores, *image_hw))
    given = label_map(got[None].astype(np.float32), (2 * image_hw[0], image_hw[1]), True)
    np.testing.assert_array_equal(given, np.repeat(got, 2, axis=0))


def test_class_shares_and_overlay():
    labels = np.array([[0, 2, 2], [2, 7, 0]], np.uint8)
    assert class_shares(labels) == [(2, 3, 0.5), (0, 2, 2 / 6), (7, 1, 1 / 6)]
    image = np.random.default_rng(0).random((2, 3, 3)).astype(np.float32)
    palette = voc_palette(8)
    blended = overlay(image, labels, palette)
    for y in range(2):
        for x in range(3):
            want = [round((image[y, x, k] * 255 + int(palette[labels[y, x], k])) / 2)
                    for k in range(3)]  # fmt: skip
            assert blended[y, x].tolist() == pytest.approx(want, abs=0.5 + 1e-9)


def _tiled_random(net: Net, seed: int) -> None:
    # FCN-8s holds 134M weights: a short random vector repeated fills them in a fraction of
    # the time a full draw takes; its length (a prime) keeps the pattern off the layouts.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for blobs in net.params.values():
            for blob in blobs:
                n = blob.numel()
                pattern = torch.randn(min(n, 65537), generator=gen) / max(1.0, blob[0].numel()
                                                                           ** 0.5)  # fmt: skip
                blob.view(-1).copy_(pattern.repeat(n // len(pattern) + 1)[:n])


@pytest.mark.slow
@pytest.mark.skipif(not FCN8S.is_file(), reason="../shared/corpus not present")
def test_fcn8s_label_map_is_the_argmax_of_its_score(tmp_path):
    net = Net.from_prototxt(str(FCN8S), "TEST", input_shapes={"data": (1, 3, 40, 36)})
    _tiled_random(net, 0)
    assert output_task(net) == ("segment", "score")
    rgb = np.random.default_rng(1).integers(0, 256, (29, 43, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "photo.png")
    clf = Classifier(net, image_dims=(40, 36), mean=FCN_MEAN, raw_scale=255.0,
                     channel_swap=(2, 1, 0))  # fmt: skip
    [(path, image, labels)] = list(segment_files(clf, [str(tmp_path / "photo.png")], "score"))
    assert path.endswith("photo.png") and image.shape == (29, 43, 3)
    # the net saw pycaffe's preprocessing of the photo (resized to the input, no crop) ...
    want_in = ref_preprocess((rgb / 255.0).astype(np.float32), (40, 36), (2, 0, 1), [2, 1, 0],
                             255.0, FCN_MEAN[:, None, None], None)  # fmt: skip
    np.testing.assert_allclose(net.blobs["data"][0].numpy(), want_in, atol=2e-3)
    # ... and the label map is the argmax of the score it gave, at the photo's size
    scores = net.blobs["score"][0].numpy()
    assert scores.shape == (21, 40, 36)
    want = ref_label_map(scores, 29, 43)
    assert len(np.unique(want)) > 1  # the random weights do pick several classes
    np.testing.assert_array_equal(labels, want)
