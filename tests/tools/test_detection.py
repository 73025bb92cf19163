"""caffe_alex.tools.detection: DetectionOutput rows as boxes in image pixels, and the boxes drawn.
The whole path through a real detector (MobileNet-SSD) is in tests/commands/test_deploy.py."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from caffe_alex.errors import CaffeAlexError
from caffe_alex.tools.detection import Box, boxes_per_image, draw_boxes
from caffe_alex.tools.segmentation import voc_palette


def test_rows_become_boxes_in_each_images_pixels():
    rows = np.array([
        [0, 3, 0.40, 0.10, 0.20, 0.50, 0.90],
        [1, 7, 0.95, -0.05, 0.00, 1.02, 0.50],  # corners beyond the image stay as given
        [0, 3, 0.80, 0.25, 0.25, 0.75, 0.75],
        [0, 2, 0.05, 0.00, 0.00, 0.10, 0.10],  # under the threshold
    ], np.float32)[None, None]  # fmt: skip
    sizes = [(200, 300), (50, 40)]
    first, second = boxes_per_image(rows, sizes, threshold=0.1)
    assert [b.score for b in first] == pytest.approx([0.80, 0.40])  # highest score first
    r = rows[0, 0]
    assert first[0] == Box(3, float(r[2, 2]), float(r[2, 3]) * 300, float(r[2, 4]) * 200,
                           float(r[2, 5]) * 300, float(r[2, 6]) * 200)  # fmt: skip
    assert second == [Box(7, float(r[1, 2]), float(r[1, 3]) * 40, 0.0, float(r[1, 5]) * 40,
                          float(r[1, 6]) * 50)]  # fmt: skip
    assert len(boxes_per_image(rows, sizes)[0]) == 3


def test_ssd_placeholder_rows_and_bad_blobs():
    placeholder = np.full((1, 1, 2, 7), -1, np.float32)  # one per image: its index, then -1
    placeholder[0, 0, :, 0] = [0, 1]
    assert boxes_per_image(placeholder, [(5, 5), (6, 6)], threshold=-2) == [[], []]
    with pytest.raises(CaffeAlexError, match="7 values per box"):
        boxes_per_image(np.zeros((1, 1, 2, 6)), [(5, 5)])
    with pytest.raises(CaffeAlexError, match="names image 2 of a batch of 2"):
        boxes_per_image(np.array([[2, 1, 0.9, 0, 0, 1, 1]]), [(5, 5), (5, 5)])


def test_drawing_changes_only_pixels_near_the_boxes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3)).astype(np.float32) / 255.0
    boxes = [Box(1, 0.9, 20.2, 40.0, 70.0, 100.6), Box(15, 0.5, 100.0, 5.0, 170.0, 60.0)]
    drawn = draw_boxes(image, boxes, {1: "aeroplane"}, voc_palette(21))
    assert drawn.shape == (120, 160, 3) and drawn.dtype == np.uint8
    original = np.round(image * 255).astype(np.uint8)
    changed = np.any(drawn != original, axis=2)
    allowed = np.zeros_like(changed)
    for box, text in zip(boxes, ["aeroplane 0.90", "15 0.50"]):
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
        x0, y0, x1, y1 = (int(round(v)) for v in box.corners)
        allowed[max(0, y0 - th - base - 1) : y1 + 2, max(0, x0 - 1) : max(x1, x0 + tw) + 2] = True
    assert changed.any() and not (changed & ~allowed).any()
    # each box's outline is in its class's VOC colour
    assert drawn[70, 20].tolist() == voc_palette(21)[1].tolist()
    assert drawn[30, 159].tolist() == voc_palette(21)[15].tolist()  # clipped to the image
    inside = np.zeros_like(changed)
    inside[42:99, 22:69] = True
    assert not (changed & inside).any()
