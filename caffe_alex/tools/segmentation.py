"""What ``caffe-alex deploy`` does with a segmentation net (FCN, DeepLab, SegNet: an N x C x H x
W score map): the label map per image (argmax over C, brought back to the image's size), the
classes it holds with their pixel shares, and a coloured overlay.

The colours are PASCAL VOC's colour map (class 0 black, 1 dark red, 2 dark green, ...), which
the VOC label PNGs and most segmentation tools use, so a label map drawn here looks like the
dataset's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from .pycaffe_io import load_batches


def voc_palette(count: int) -> np.ndarray:
    """PASCAL VOC's colour map for classes 0..count-1 as count x 3 uint8 RGB: the bits of the
    class number are dealt out in turn to red, green and blue, from the top bit down."""
    labels = np.arange(count, dtype=np.int64)
    colours = np.zeros((count, 3), np.int64)
    for step in range(8):
        for channel in range(3):
            bit = (labels >> (3 * step + channel)) & 1
            colours[:, channel] |= bit << (7 - step)
    return colours.astype(np.uint8)


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    # each output pixel takes the input pixel its centre falls in
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


def label_map(scores: np.ndarray, size: tuple[int, int], classes_given: bool = False):
    """C x h x w scores -> the H x W map of the best class per pixel (``size`` = (H, W)), taken
    at the net's resolution and resized by nearest neighbour (so only classes the net chose
    appear); ties go to the lower class. With ``classes_given`` the 1 x h x w input already
    holds class numbers (an ArgMax top). uint8, or uint16 when class numbers pass 255."""
    scores = np.asarray(scores)
    if classes_given:
        best = np.rint(scores[0]).astype(np.int64)
        wide = best.max(initial=0) > 255
    else:
        best, wide = scores.argmax(axis=0), scores.shape[0] > 256
    rows = _nearest_indices(best.shape[0], int(size[0]))
    cols = _nearest_indices(best.shape[1], int(size[1]))
    return best[rows][:, cols].astype(np.uint16 if wide else np.uint8)


def class_shares(labels: np.ndarray) -> list[tuple[int, int, float]]:
    """(class, pixels, share of the image) for each class present, largest share first."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64))
    present = np.flatnonzero(counts)
    order = present[np.argsort(-counts[present], kind="stable")]
    return [(int(c), int(counts[c]), counts[c] / labels.size) for c in order]


def overlay(image: np.ndarray, labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The image (H x W x 3 RGB float in [0, 1]) blended half and half with its label colours,
    as 8-bit RGB."""
    pixels = np.clip(image[..., :3], 0, 1) * 255.0
    colours = palette[labels.astype(np.int64) % len(palette)].astype(np.float64)
    return np.round(0.5 * pixels + 0.5 * colours).astype(np.uint8)


def segment_files(clf, paths: Iterable[str], blob: str, classes_given: bool = False,
                  on_error: Callable[[str, str], None] | None = None) -> Iterator:  # fmt: skip
    """Yield (path, image, label map) per readable image; ``clf`` is a Classifier whose image
    dims are the net input (images resized to it, not cropped) and ``blob`` the score map
    (or class numbers, ``classes_given``)."""
    for names, images in load_batches(paths, clf.batch_size, clf.channels != 1, on_error):
        scores = clf.forward_all(clf.prepare(images, oversample=False), [blob])[blob]
        for name, image, score in zip(names, images, scores):
            yield name, image, label_map(score, image.shape[:2], classes_given)
