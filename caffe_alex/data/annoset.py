"""SSD's convert_annoset (weiliu89/caffe, branch ``ssd``: tools/convert_annoset.cpp with
util/io.cpp's ReadRichImageToAnnotatedDatum, ReadXMLToAnnotatedDatum, ReadJSONToAnnotatedDatum,
ReadTxtToAnnotatedDatum and MapNameToLabel): images and their box annotations -> AnnotatedDatum
records in a new LMDB or LevelDB, keyed ``%08d_<image path>``.

The list file holds ``<image> <annotation>`` lines (paths relative to the root folder, joined by
plain concatenation as the fork does) for anno_type "detection", or ``<image> <label>`` lines
for "classification" (the fork's default). Annotations are PASCAL VOC XML (label_type "xml"),
the fork's COCO-style JSON ("json") or ``label xmin ymin xmax ymax`` lines ("txt"); boxes are
stored normalized by the image size the annotation gives (XML, JSON) or the image's own
(txt), grouped by label in order of appearance, each group's instances numbered from 0.

Where the fork carries on quietly with a broken annotation this stops with one line naming the
file: a missing annotation file (the fork stores the image without boxes; give it an XML file
without objects for that), a coordinate that is not an integer (the fork reads 0), a missing
coordinate, a malformed txt line (the fork stops reading the file there).
"""

from __future__ import annotations

import json
import os
import random
import xml.etree.ElementTree as ElementTree

import cv2
import numpy as np
from google.protobuf import text_format

from ..errors import CaffeAlexError, describe
from ..log import get_logger
from ..proto import caffe_pb2
from .datum import ImageError, array_to_datum, encode_image, load_image
from .db import open_db
from .tools import COMMIT_EVERY, no_progress

ANNO_TYPES = ("classification", "detection")
LABEL_TYPES = ("xml", "json", "txt")
f32 = np.float32


# ---- label maps -------------------------------------------------------------------------------


def read_label_map(path: str) -> caffe_pb2.LabelMap:
    """A LabelMap in protobuf text format (``item { name: "car" label: 1 ... }``)."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise CaffeAlexError(f"cannot read label map file '{path}': {describe(exc)}") from None
    try:
        return text_format.Parse(text, caffe_pb2.LabelMap())
    except text_format.ParseError as exc:
        raise CaffeAlexError(f"{path}:{exc}") from None


def name_to_label(label_map, path: str, strict: bool = False) -> dict[str, int]:
    """MapNameToLabel: name -> label; a later item wins, unless ``strict`` (--check_label),
    where a name given twice is an error."""
    names: dict[str, int] = {}
    for item in label_map.item:
        if strict and item.name in names:
            raise CaffeAlexError(f"label map '{path}' names '{item.name}' more than once")
        names[item.name] = item.label
    return names


# ---- annotation files -------------------------------------------------------------------------


class _Groups:
    """AnnotationGroups filled as the fork's readers fill them: a box joins its label's group
    (made on first sight, in order), numbered after the group's last instance."""

    def __init__(self, record: caffe_pb2.AnnotatedDatum):
        self.record = record

    def add(self, label: int) -> caffe_pb2.Annotation:
        for group in self.record.annotation_group:
            if group.group_label == label:
                instance = group.annotation[-1].instance_id + 1 if group.annotation else 0
                anno = group.annotation.add()
                anno.instance_id = instance
                return anno
        group = self.record.annotation_group.add()
        group.group_label = label
        anno = group.annotation.add()
        anno.instance_id = 0
        return anno


def _set_box(anno, box, width, height, difficult, path) -> None:
    xmin, ymin, xmax, ymax = box
    log = get_logger()
    if min(box) < 0 or max(xmin, xmax) > width or max(ymin, ymax) > height:
        log.warning("%s bounding box exceeds image boundary.", path)
    if xmin > xmax or ymin > ymax:
        log.warning("%s bounding box irregular.", path)
    b = anno.bbox
    b.xmin, b.ymin = f32(xmin) / f32(width), f32(ymin) / f32(height)
    b.xmax, b.ymax = f32(xmax) / f32(width), f32(ymax) / f32(height)
    b.difficult = bool(difficult)


def _image_size(given, image_hw, path) -> tuple[int, int]:
    """The annotation's own (width, height), else the image's, as the fork falls back."""
    width, height = given
    if width is None or height is None:
        get_logger().warning("When parsing %s: no image size; using the image's", path)
        height, width = image_hw
    if height != image_hw[0]:
        get_logger().warning("%s inconsistent image height.", path)
    if width != image_hw[1]:
        get_logger().warning("%s inconsistent image width.", path)
    if width == 0 or height == 0:
        raise CaffeAlexError(f"{path}: no valid image width/height")
    return width, height


def _int(text, what: str, path: str) -> int:
    if text is None:
        raise CaffeAlexError(f"{path}: {what} is missing")
    try:
        return int(text.strip())
    except ValueError:
        raise CaffeAlexError(
            f"{path}: {what} {text.strip()!r} is not an integer (the fork would read it as 0)"
        ) from None


def _unknown(name, path) -> CaffeAlexError:
    return CaffeAlexError(f"{path}: unknown name {name!r}: it is not in the label map")


def read_xml(path, names, image_hw, record) -> None:
    """ReadXMLToAnnotatedDatum: PASCAL VOC XML. Inside an <object>, <difficult> applies to
    the <bndbox> after it, and a <bndbox> needs a <name> before it, as in the fork's walk."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as exc:
        raise CaffeAlexError(f"{path}: not well-formed XML: {exc}") from None
    if root.tag != "annotation":
        raise CaffeAlexError(f"{path}: the root element is <{root.tag}>, not <annotation>")
    size = root.find("size")
    given = (None, None)
    if size is not None and size.find("width") is not None and size.find("height") is not None:
        try:
            given = (int(size.findtext("width").strip()), int(size.findtext("height").strip()))
        except ValueError:
            given = (None, None)
    width, height = _image_size(given, image_hw, path)
    groups = _Groups(record)
    for obj in root.findall("object"):
        anno, difficult = None, False
        for child in obj:
            if child.tag == "name":
                name = child.text or ""
                if name not in names:
                    raise _unknown(name, path)
                anno = groups.add(names[name])
            elif child.tag == "difficult":
                difficult = child.text == "1"
            elif child.tag == "bndbox":
                if anno is None:
                    raise CaffeAlexError(f"{path}: an <object> has a <bndbox> before its <name>")
                box = [_int(child.findtext(k), f"<{k}>", path)
                       for k in ("xmin", "ymin", "xmax", "ymax")]  # fmt: skip
                _set_box(anno, box, width, height, difficult, path)


def read_json(path, names, image_hw, record) -> None:
    """ReadJSONToAnnotatedDatum: {"image": {"width", "height"}, "annotation": [{"category_id",
    "bbox": [x, y, w, h], "iscrowd"}]}; crowd boxes are stored as difficult."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise CaffeAlexError(f"{path}: cannot read JSON: {describe(exc)}") from None
    image = data.get("image", {}) if isinstance(data, dict) else {}
    given = (image.get("width"), image.get("height"))
    width, height = _image_size(given, image_hw, path)
    groups = _Groups(record)
    for obj in data.get("annotation", []):
        name = str(obj.get("category_id"))
        if name not in names:
            raise _unknown(name, path)
        anno = groups.add(names[name])
        bbox = obj.get("bbox", [])
        if len(bbox) != 4:
            raise CaffeAlexError(f"{path}: a bbox needs 4 numbers [x, y, w, h], got {bbox}")
        x, y, w, h = (f32(v) for v in bbox)
        _set_box(anno, (x, y, x + w, y + h), width, height, obj.get("iscrowd", 0), path)


def read_txt(path, image_hw, record) -> None:
    """ReadTxtToAnnotatedDatum: ``label xmin ymin xmax ymax`` per box, in pixels of the image."""
    with open(path) as f:
        tokens = f.read().split()
    if len(tokens) % 5:
        raise CaffeAlexError(f"{path}: expected 'label xmin ymin xmax ymax' groups of 5 numbers")
    height, width = image_hw
    groups = _Groups(record)
    for k in range(0, len(tokens), 5):
        try:
            label = int(tokens[k])
            box = [f32(float(t)) for t in tokens[k + 1 : k + 5]]
        except ValueError:
            raise CaffeAlexError(
                f"{path}: box {k // 5} is not 'label xmin ymin xmax ymax'"
            ) from None
        _set_box(groups.add(label), box, width, height, False, path)


# ---- images -----------------------------------------------------------------------------------


def read_image(path: str, color: bool, height: int, width: int, min_dim: int, max_dim: int):
    """ReadImageToCVMat: imread, then scaled so the short side reaches min_dim and the long
    side stays within max_dim (aspect kept), else warped to height x width when both are set.
    Returns (C x H x W uint8, the file's own (H, W) read as the fork's GetImageSize does)."""
    pixels = load_image(path, color)
    original = pixels.shape[1:]
    if not color:  # GetImageSize reads in colour; only the size matters
        original = load_image(path, True).shape[1:]
    if min_dim > 0 or max_dim > 0:
        rows, cols = pixels.shape[1:]
        small, large = min(rows, cols), max(rows, cols)
        factor = f32(1)
        if min_dim > 0 and small < min_dim:
            factor = f32(min_dim) / f32(small)
        if max_dim > 0 and int(factor * f32(large)) > max_dim:
            factor = f32(max_dim) / f32(large)
        if factor != 1:
            hwc = np.ascontiguousarray(pixels.transpose(1, 2, 0))
            out = cv2.resize(hwc, (0, 0), fx=float(factor), fy=float(factor))
            pixels = out.reshape(out.shape[0], out.shape[1], -1).transpose(2, 0, 1)
    elif height > 0 and width > 0:
        pixels = load_image(path, color, height, width)
    return np.ascontiguousarray(pixels), original


def image_datum(path, name, label, color, height, width, min_dim, max_dim, encoding, guessed):
    """ReadImageToDatum: raw pixels, or encoded: the file's own bytes where nothing was
    resized, the colour matches and the extension names the encoding, else re-encoded. (The
    fork's guess of the encoding keeps the extension's dot, so with a guessed encoding it
    always re-encodes; so does this.) Returns (datum, the file's (H, W))."""
    pixels, original = read_image(path, color, height, width, min_dim, max_dim)
    if not encoding:
        return array_to_datum(pixels, label), original
    ext = name.rpartition(".")[2].lower()
    keep = (
        not guessed
        and (pixels.shape[0] == 3) == color
        and not (height or width or min_dim or max_dim)
        and (ext == encoding or (encoding, ext) == ("jpg", "jpeg"))
    )
    datum = caffe_pb2.Datum(channels=pixels.shape[0], height=pixels.shape[1],
                            width=pixels.shape[2], label=int(label), encoded=True)  # fmt: skip
    if keep:
        with open(path, "rb") as f:
            datum.data = f.read()
    else:
        datum.data = encode_image(pixels, encoding)
    return datum, original


# ---- the tool ---------------------------------------------------------------------------------


def read_annoset_list(path: str, anno_type: str) -> list[tuple[str, str | int]]:
    """Whitespace-separated pairs, as the fork reads them with operator>>."""
    try:
        with open(path) as f:
            tokens = f.read().split()
    except OSError as exc:
        raise CaffeAlexError(f"cannot read list file '{path}': {describe(exc)}") from None
    if len(tokens) % 2:
        raise CaffeAlexError(f"{path}: the last image '{tokens[-1]}' has no annotation or label")
    pairs = list(zip(tokens[::2], tokens[1::2]))
    if anno_type == "classification":
        try:
            return [(image, int(label)) for image, label in pairs]
        except ValueError:
            bad = next(label for _, label in pairs if not label.lstrip("-").isdigit())
            raise CaffeAlexError(
                f"{path}: label {bad!r} is not an integer (use --anno_type detection for "
                "'<image> <annotation file>' lines)"
            ) from None
    return pairs


def convert_annoset(
    root: str,
    list_file: str,
    db_path: str,
    *,
    anno_type: str = "classification",
    label_type: str = "xml",
    label_map_file: str = "",
    check_label: bool = False,
    min_dim: int = 0,
    max_dim: int = 0,
    resize_height: int = 0,
    resize_width: int = 0,
    gray: bool = False,
    shuffle: bool = False,
    seed: int | None = None,
    backend: str = "lmdb",
    check_size: bool = False,
    encoded: bool = False,
    encode_type: str = "",
    progress=no_progress,
) -> int:
    """The fork's convert_annoset; returns the number of records written. An image that
    cannot be read is skipped with a warning, as the fork skips it; a bad annotation stops."""
    _check_types(anno_type, label_type)
    names = _label_names(anno_type, label_type, label_map_file, check_label)
    lines = _listed_images(list_file, anno_type, shuffle, seed)
    if encode_type and not encoded:
        get_logger().info("encode_type specified, assuming encoded=true.")
    size = [max(0, v) for v in (resize_height, resize_width, min_dim, max_dim)]
    records = _records(root, lines, anno_type, label_type, names, not gray, size, encoded,
                       encode_type, progress)  # fmt: skip
    return _write_records(db_path, backend, records, check_size)


def _check_types(anno_type: str, label_type: str) -> None:
    if anno_type not in ANNO_TYPES:
        raise CaffeAlexError(f"unknown anno_type '{anno_type}' ({', '.join(ANNO_TYPES)})")
    if label_type not in LABEL_TYPES:
        raise CaffeAlexError(f"unknown label_type '{label_type}' ({', '.join(LABEL_TYPES)})")


def _label_names(anno_type, label_type, label_map_file, check_label) -> dict[str, int]:
    """Name -> label from the label map, which only XML and JSON detection annotations need."""
    if anno_type == "detection" and label_type != "txt":
        if not label_map_file:
            raise CaffeAlexError("--anno_type detection needs --label_map_file")
        return name_to_label(read_label_map(label_map_file), label_map_file, check_label)
    return {}


def _listed_images(list_file, anno_type, shuffle, seed) -> list[tuple[str, str | int]]:
    """The list file's pairs, shuffled on request, their number logged."""
    log = get_logger()
    lines = read_annoset_list(list_file, anno_type)
    if shuffle:
        log.info("Shuffling data")
        random.Random(seed).shuffle(lines)
    log.info("A total of %d images.", len(lines))
    return lines


def _encoding(name: str, encode_type: str, encoded: bool) -> tuple[str, bool]:
    """(the encoding to store ``name`` in, "" for raw pixels; whether it was guessed from the
    file's extension, as the fork guesses it when --encoded comes without --encode_type)."""
    encoding = encode_type.lower().lstrip(".")
    if encoded and not encoding:
        if "." not in name:
            raise CaffeAlexError(
                f"cannot guess the encoding of '{name}' (no extension); give --encode_type"
            )
        return name.rpartition(".")[2].lower(), True
    return encoding, False


def _records(root, lines, anno_type, label_type, names, color, size, encoded, encode_type,
             progress):  # fmt: skip
    """(key, image name, AnnotatedDatum) for each line whose image can be read, in order."""
    for line_id, (name, target) in enumerate(lines):
        encoding, guessed = _encoding(name, encode_type, encoded)
        record = _record(root, name, target, anno_type, label_type, names, color, size,
                         encoding, guessed)  # fmt: skip
        progress(1)
        if record is None:
            get_logger().warning("Failed to read %s", name)
            continue
        yield f"{line_id:08d}_{name}", name, record


def _check_shape(first, datum, name: str):
    """--check_size: ``first`` is the (C x H x W, name) of the first record, None before it;
    returns it."""
    shape = (datum.channels, datum.height, datum.width)
    first = first or (shape, name)
    if shape != first[0]:
        raise CaffeAlexError(
            f"--check_size: '{name}' has shape {shape} but '{first[1]}' has {first[0]} (C x H x W)"
        )
    return first


def _write_records(db_path, backend, records, check_size: bool) -> int:
    """Put ``records`` into a new database, committing every COMMIT_EVERY as the fork does;
    returns how many."""
    log = get_logger()
    count, first = 0, None
    with open_db(db_path, backend, mode="new") as db:
        txn = db.transaction()
        for key, name, record in records:
            if check_size:
                first = _check_shape(first, record.datum, name)
            txn.put(key, record.SerializeToString())
            count += 1
            if count % COMMIT_EVERY == 0:
                txn.commit()
                txn = db.transaction()
                log.info("Processed %d files.", count)
        if count % COMMIT_EVERY:
            txn.commit()
            log.info("Processed %d files.", count)
    return count


def _record(root, name, target, anno_type, label_type, names, color, size, encoding, guessed):
    height, width, min_dim, max_dim = size
    image_path = root + name
    record = caffe_pb2.AnnotatedDatum()
    label = target if anno_type == "classification" else -1
    try:
        datum, original = image_datum(image_path, name, label, color, height, width, min_dim,
                                      max_dim, encoding, guessed)  # fmt: skip
    except (ImageError, OSError) as exc:
        get_logger().error("Could not open or find file %s (%s)", image_path, exc)
        return None
    record.datum.CopyFrom(datum)
    if anno_type == "classification":
        return record
    record.type = caffe_pb2.AnnotatedDatum.BBOX
    annotation = root + target
    if not os.path.isfile(annotation):
        raise CaffeAlexError(
            f"annotation file '{annotation}' (for '{name}') does not exist; for an image "
            "without objects give an annotation file without any"
        )
    if label_type == "xml":
        read_xml(annotation, names, original, record)
    elif label_type == "json":
        read_json(annotation, names, original, record)
    else:
        read_txt(annotation, original, record)
    return record
