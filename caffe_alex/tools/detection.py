"""What ``caffe-alex deploy`` does with a detector: the rows of an SSD DetectionOutput blob as
boxes in each image's pixels, and the boxes drawn on the image.

SSD's DetectionOutput writes a 1 x 1 x N x 7 blob, one row per kept box: (image id within the
batch, class label, score, xmin, ymin, xmax, ymax) with the corners relative to the image
(0..1), so they scale to any image size however it was resized for the net. When it keeps
nothing in the whole batch it writes one placeholder row per image, the image's index and six
-1 (OpenCV's version pads with rows of 0 instead, which a score threshold drops). Corners are
reported as the net gives them, not clipped to the image; only drawing clips them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ..errors import CaffeAlexError
from .pycaffe_io import load_batches

ROW = 7  # image_id, label, score, xmin, ymin, xmax, ymax


@dataclass
class Box:
    label: int
    score: float
    xmin: float
    ymin: float
    xmax: float
    ymax: float

    @property
    def corners(self) -> tuple[float, float, float, float]:
        return self.xmin, self.ymin, self.xmax, self.ymax


def boxes_per_image(rows, sizes: Sequence[tuple[int, int]], threshold: float = 0.0):
    """DetectionOutput rows -> one list of Box per image (``sizes``: each image's (height,
    width)), scores at least ``threshold``, highest score first. A row naming an image the
    batch does not have is an error: the blob does not come from this batch."""
    rows = np.asarray(rows, dtype=np.float32)
    if rows.size % ROW:
        raise CaffeAlexError(
            f"a detection output has 7 values per box (image id, label, score, xmin, ymin, "
            f"xmax, ymax); this blob has shape {list(rows.shape)}"
        )
    found: list[list[Box]] = [[] for _ in sizes]
    for image_id, label, score, x0, y0, x1, y1 in rows.reshape(-1, ROW):
        if image_id < 0 or label < 0:  # SSD's "nothing kept" placeholder
            continue
        index = int(image_id)
        if index >= len(sizes):
            raise CaffeAlexError(
                f"the detection output names image {index} of a batch of {len(sizes)}"
            )
        if score < threshold:
            continue
        height, width = sizes[index]
        found[index].append(
            Box(int(label), float(score), float(x0) * width, float(y0) * height,
                float(x1) * width, float(y1) * height)
        )  # fmt: skip
    for boxes in found:
        boxes.sort(key=lambda b: -b.score)
    return found


def detect_files(clf, paths: Iterable[str], blob: str, threshold: float = 0.0,
                 on_error: Callable[[str, str], None] | None = None) -> Iterator:  # fmt: skip
    """Yield (path, image, boxes) per readable image; ``clf`` is a Classifier whose image dims
    are the net input (images are resized to it, not cropped, as SSD's deploy scripts do) and
    ``blob`` the DetectionOutput top. ``image`` is the H x W x 3 RGB float image as loaded."""
    for names, images in load_batches(paths, clf.batch_size, clf.channels != 1, on_error):
        rows = clf.forward_all(clf.prepare(images, oversample=False), [blob])[blob]
        sizes = [im.shape[:2] for im in images]
        yield from zip(names, images, boxes_per_image(rows, sizes, threshold))


# ---- drawing --------------------------------------------------------------------------------
def draw_boxes(image: np.ndarray, boxes: Sequence[Box], names: dict[int, str],
               palette: np.ndarray) -> np.ndarray:  # fmt: skip
    """The image (H x W x 3 RGB float in [0, 1], as loaded) as 8-bit RGB with each box drawn
    in its class's colour, labelled with its name and score. Pixels away from the boxes and
    their labels keep their values."""
    canvas = np.ascontiguousarray(
        np.round(np.clip(image[..., :3], 0, 1) * 255)[..., ::-1].astype(np.uint8)
    )
    height, width = canvas.shape[:2]
    thickness = max(1, round(min(height, width) / 300))
    for box in boxes:
        colour = tuple(int(c) for c in palette[box.label % len(palette)][::-1])  # RGB -> BGR
        x0, y0, x1, y1 = (int(round(v)) for v in box.corners)
        x0, x1 = np.clip([x0, x1], 0, width - 1)
        y0, y1 = np.clip([y0, y1], 0, height - 1)
        cv2.rectangle(canvas, (int(x0), int(y0)), (int(x1), int(y1)), colour, thickness)
        text = f"{names.get(box.label, str(box.label))} {box.score:.2f}"
        scale = 0.4 * thickness
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        top = int(y0) - th - base if int(y0) - th - base >= 0 else int(y0)  # inside if no room
        cv2.rectangle(canvas, (int(x0), top), (int(x0) + tw, top + th + base), colour, -1)
        cv2.putText(canvas, text, (int(x0), top + th), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    _ink(colour), 1, cv2.LINE_AA)  # fmt: skip
    return np.ascontiguousarray(canvas[..., ::-1])


def _ink(colour) -> tuple[int, int, int]:
    # black text on light label backgrounds, white on dark ones
    light = 0.114 * colour[0] + 0.587 * colour[1] + 0.299 * colour[2] > 128
    return (0, 0, 0) if light else (255, 255, 255)
