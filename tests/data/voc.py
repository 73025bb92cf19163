"""A small PASCAL-VOC-style data set written into a folder: random-pixel images, one XML
annotation each, a list file and a label map, for convert-annoset and AnnotatedData tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

LABEL_MAP = """item { name: "none_of_the_above" label: 0 display_name: "background" }
item { name: "car" label: 1 display_name: "car" }
item { name: "bus" label: 2 display_name: "bus" }
item { name: "dog" label: 3 display_name: "dog" }
"""
NAMES = {"car": 1, "bus": 2, "dog": 3}

# Per image: (width, height, [(name, xmin, ymin, xmax, ymax, difficult), ...])
IMAGES = [
    (60, 40, [("car", 4, 6, 30, 30, 0), ("bus", 34, 10, 56, 36, 0), ("car", 10, 20, 24, 38, 1)]),
    (48, 48, [("dog", 8, 8, 40, 40, 0)]),
    (64, 32, [("bus", 2, 2, 20, 30, 0), ("car", 30, 4, 62, 28, 0)]),
    (50, 40, [("dog", 20, 10, 45, 35, 0), ("dog", 1, 1, 15, 15, 1)]),
]


def xml_text(width, height, objects, size=True) -> str:
    parts = ["<annotation>\n\t<folder>VOC</folder>\n"]
    if size:
        parts.append(f"\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n"
                     "\t\t<depth>3</depth>\n\t</size>\n")  # fmt: skip
    for name, x0, y0, x1, y1, difficult in objects:
        parts.append(
            f"\t<object>\n\t\t<name>{name}</name>\n\t\t<pose>Unspecified</pose>\n"
            f"\t\t<truncated>0</truncated>\n\t\t<difficult>{difficult}</difficult>\n"
            f"\t\t<bndbox>\n\t\t\t<xmin>{x0}</xmin>\n\t\t\t<ymin>{y0}</ymin>\n"
            f"\t\t\t<xmax>{x1}</xmax>\n\t\t\t<ymax>{y1}</ymax>\n\t\t</bndbox>\n\t</object>\n"
        )
    parts.append("</annotation>\n")
    return "".join(parts)


def write_voc(folder: Path, images=IMAGES, ext="png", seed=0) -> dict:
    """Images under JPEGImages/, XML under Annotations/, list.txt and labelmap.prototxt.
    Returns the paths and each image's pixels (H x W x 3 BGR, as OpenCV reads them)."""
    rng = np.random.default_rng(seed)
    (folder / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (folder / "Annotations").mkdir(exist_ok=True)
    lines, pixels = [], []
    for i, (w, h, objects) in enumerate(images):
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        name = f"JPEGImages/{i:06d}.{ext}"
        cv2.imwrite(str(folder / name), image)
        pixels.append(cv2.imread(str(folder / name)))
        (folder / "Annotations" / f"{i:06d}.xml").write_text(xml_text(w, h, objects))
        lines.append(f"{name} Annotations/{i:06d}.xml")
    (folder / "list.txt").write_text("\n".join(lines) + "\n")
    (folder / "labelmap.prototxt").write_text(LABEL_MAP)
    return {
        "root": str(folder) + "/",
        "list": str(folder / "list.txt"),
        "labelmap": str(folder / "labelmap.prototxt"),
        "pixels": pixels,
    }


def normalized(image_index: int, images=IMAGES) -> np.ndarray:
    """The (K, 7) rows an image's record should give: label, instance, box / size, difficult,
    grouped by label in order of first appearance, as the fork's XML reader groups them."""
    w, h, objects = images[image_index]
    order, groups = [], {}
    for obj in objects:
        if obj[0] not in groups:
            order.append(obj[0])
            groups[obj[0]] = []
        groups[obj[0]].append(obj)
    rows = []
    for name in order:
        for instance, (_, x0, y0, x1, y1, difficult) in enumerate(groups[name]):
            box = np.array([x0, y0, x1, y1], np.float32) / np.array([w, h, w, h], np.float32)
            rows.append([NAMES[name], instance, *box, difficult])
    return np.array(rows, np.float32).reshape(-1, 7)
