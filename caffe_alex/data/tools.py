"""The dataset tools, with the semantics of Caffe's tools/convert_imageset,
tools/compute_image_mean and examples/mnist/convert_mnist_data, plus db_info.

Each returns what it made and logs Caffe's lines ("A total of N images.", "Processed N
files.", "mean_value channel [c]: v"); the CLI commands in caffe_alex/commands/data.py wrap
them and add progress bars through the ``progress`` callback (called with a record count).
"""

from __future__ import annotations

import gzip
import io
import random
import struct
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ..errors import CaffeAlexError, describe
from ..formats.caffemodel import write_binaryproto
from ..log import get_logger
from .datum import (
    ImageError,
    array_to_datum,
    datum_to_array,
    encode_image,
    encoded_datum,
    load_image,
    parse_datum,
    resize_linear,
)
from .db import open_db

COMMIT_EVERY = 1000  # records per transaction, as Caffe's tools commit


def no_progress(records: int) -> None:
    """The ``progress`` callback of a run that shows none."""


# ---- convert_imageset -------------------------------------------------------------------------


def read_list_file(path: str) -> list[tuple[str, int]]:
    """``<path> <label>`` lines; the label follows the LAST space, so paths may hold spaces."""
    try:
        with open(path) as f:
            text = f.read().splitlines()
    except OSError as exc:
        raise CaffeAlexError(f"cannot read list file '{path}': {exc.strerror}") from None
    lines = []
    for number, line in enumerate(text, 1):
        if not line.strip():
            continue
        name, space, label = line.rpartition(" ")
        if not space or not name:
            raise CaffeAlexError(f"{path}:{number}: no label after the image name: {line!r}")
        try:
            lines.append((name, int(label)))
        except ValueError:
            raise CaffeAlexError(f"{path}:{number}: label {label!r} is not an integer") from None
    return lines


def _image_record(root, name, label, color, height, width, encoding):
    """ReadImageToDatum: (datum, C x H x W shape), or None when the image cannot be read."""
    path = root + name
    try:
        pixels = load_image(path, color, height, width)
    except (ImageError, OSError) as exc:
        get_logger().error("Could not open or find file %s (%s)", path, exc)
        return None
    if not encoding:
        return array_to_datum(pixels, label), pixels.shape
    ext = name.rpartition(".")[2].lower()
    if not height and not width and (ext == encoding or (encoding, ext) == ("jpg", "jpeg")):
        with open(path, "rb") as f:  # the file already has the wanted encoding: keep its bytes
            return encoded_datum(f.read(), label), pixels.shape
    return encoded_datum(encode_image(pixels, encoding), label), pixels.shape


def convert_imageset(
    root: str,
    list_file: str,
    db_path: str,
    *,
    resize_height: int = 0,
    resize_width: int = 0,
    gray: bool = False,
    shuffle: bool = False,
    backend: str = "lmdb",
    check_size: bool = False,
    encoded: bool = False,
    encode_type: str = "",
    seed: int | None = None,
    workers: int | None = None,
    progress=no_progress,
) -> int:
    """Images listed in ``list_file`` (relative to ``root``, joined by plain concatenation as
    Caffe does) -> Datums keyed ``%08d_<name>`` in a new database. Returns the count written;
    unreadable images are skipped with an error line, as Caffe skips them."""
    log = get_logger()
    lines = _listed_images(list_file, shuffle, seed)
    if encode_type and not encoded:
        log.info("encode_type specified, assuming encoded=true.")
    encoding = encode_type.lower() if (encoded or encode_type) else ""
    height, width = max(0, resize_height), max(0, resize_width)
    count, first = 0, None
    with open_db(db_path, backend, mode="new") as db, ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(lines), COMMIT_EVERY):
            chunk = list(enumerate(lines[start : start + COMMIT_EVERY], start))
            made = pool.map(
                lambda it: _one(root, it, gray, height, width, encoded, encoding), chunk
            )
            written, first = _write_chunk(db, chunk, made, check_size, first)
            count += written
            progress(len(chunk))
            log.info("Processed %d files.", count)
    return count


def _listed_images(list_file: str, shuffle: bool, seed) -> list[tuple[str, int]]:
    """The list file's lines, shuffled on request, their number logged."""
    log = get_logger()
    lines = read_list_file(list_file)
    if shuffle:
        log.info("Shuffling data")
        random.Random(seed).shuffle(lines)  # Caffe's own RNG order cannot be reproduced
    log.info("A total of %d images.", len(lines))
    return lines


def _write_chunk(db, chunk, made, check_size: bool, first):
    """One transaction: the records read from ``chunk``'s lines (None: unreadable, skipped).
    Returns (records written, the first record's (shape, name) for --check_size)."""
    txn = db.transaction()
    for (line_id, (name, _)), record in zip(chunk, made):
        if record is not None:
            datum, shape = record
            if check_size:
                first = first or (shape, name)
                _same_size(first, shape, name)
            txn.put(f"{line_id:08d}_{name}", datum.SerializeToString())
    written = len(txn)
    txn.commit()
    return written, first


def _one(root, item, gray, height, width, encoded, encoding):
    _, (name, label) = item
    enc = encoding
    if encoded and not enc:  # guess the encoding from the file name, as Caffe does
        if "." not in name:
            get_logger().warning("Failed to guess the encoding of '%s'", name)
        enc = name.rpartition(".")[2].lower()
    return _image_record(root, name, label, not gray, height, width, enc)


def _same_size(first, shape, name):
    (want, first_name) = first
    if shape != want:
        raise CaffeAlexError(
            f"--check_size: '{name}' has shape {shape} but '{first_name}' has {want} (C x H x W)"
        )


# ---- compute_image_mean -----------------------------------------------------------------------


def compute_image_mean(
    db_path: str, output: str | None = None, backend: str | None = "lmdb", progress=no_progress
):
    """The mean of all records as Caffe's compute_image_mean computes it: summed record by
    record in float32 (Caffe accumulates in the BlobProto's floats, so huge sets round the
    same way here), divided by the count; written as a 1 x C x H x W BlobProto when
    ``output`` is given. Returns (mean C x H x W float32, per-channel means)."""
    log = get_logger()
    with open_db(db_path, backend) as db:
        total, count, first = None, 0, None
        for key, value in db:
            datum = parse_datum(value, key)
            if total is None and datum.encoded:
                log.info("Decoding Datum")
            pixels = datum_to_array(datum, key)
            if total is None:
                log.info("Starting iteration")
                total, first = np.zeros(pixels.shape, np.float32), (pixels.shape, key)
            elif pixels.size != total.size:
                raise CaffeAlexError(
                    f"record '{key.decode(errors='replace')}' has shape {pixels.shape} but "
                    f"'{first[1].decode(errors='replace')}' has {first[0]}"
                )
            np.add(total, pixels.reshape(total.shape), out=total, casting="unsafe")
            count += 1
            progress(1)
            if count % 10000 == 0:
                log.info("Processed %d files.", count)
    if count == 0:
        raise CaffeAlexError(f"database '{db_path}' holds no record")
    if count % 10000:
        log.info("Processed %d files.", count)
    mean = total / np.float32(count)
    if output:
        log.info("Write to %s", output)
        write_binaryproto(output, mean[None])
    return mean, channel_means(mean, log)


def channel_means(mean: np.ndarray, log=None) -> list[float]:
    """Per-channel averages summed in float32 in pixel order, as Caffe prints them."""
    c = mean.shape[0]
    values = [
        float(np.cumsum(mean[i].ravel(), dtype=np.float32)[-1] / np.float32(mean[i].size))
        for i in range(c)
    ]
    if log:
        log.info("Number of channels: %d", c)
        for i, v in enumerate(values):
            log.info("mean_value channel [%d]: %s", i, f"{v:g}")
    return values


# ---- convert_mnist_data -----------------------------------------------------------------------


def read_idx(path: str, magic: int) -> np.ndarray:
    """An IDX file (MNIST's format, big-endian header), plain or gzipped, as uint8 numpy."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise CaffeAlexError(f"cannot read '{path}': {exc.strerror}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
            raise CaffeAlexError(f"'{path}' is not a readable gzip file: {describe(exc)}") from None
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        kind = "image" if magic == 2051 else "label"
        raise CaffeAlexError(f"'{path}' is not an IDX {kind} file (magic number {magic})")
    dims = raw[3]  # the IDX header's own rank: 3 for images, 1 for labels
    if dims != (3 if magic == 2051 else 1):
        raise CaffeAlexError(
            f"'{path}' has {dims} dimensions; expected {3 if magic == 2051 else 1}"
        )
    if len(raw) < 4 + 4 * dims:
        raise CaffeAlexError(f"'{path}' is truncated inside its IDX header")
    shape = struct.unpack(f">{dims}I", raw[4 : 4 + 4 * dims])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * dims)
    if body.size < int(np.prod(shape)):
        raise CaffeAlexError(f"'{path}' is truncated: {body.size} bytes for shape {shape}")
    return body[: int(np.prod(shape))].reshape(shape)


def convert_mnist(
    images_path: str,
    labels_path: str,
    db_path: str,
    *,
    backend: str = "lmdb",
    resize: int = 0,
    color: bool = False,
    limit: int | None = None,
    progress=no_progress,
) -> int:
    """IDX images and labels -> Datums keyed ``%08d`` (1 x rows x cols uint8, label). With
    ``resize`` the images are resized (OpenCV's bilinear) to resize x resize, with ``color``
    the grey plane is repeated into 3 (B = G = R) channels: AlexNet's 227 x 227 x 3 input."""
    log = get_logger()
    images, labels = read_idx(images_path, 2051), read_idx(labels_path, 2049)
    if len(images) != len(labels):
        raise CaffeAlexError(
            f"{len(images)} images in '{images_path}' but {len(labels)} labels in '{labels_path}'"
        )
    n = len(images) if limit is None else min(limit, len(images))
    log.info("A total of %d items.", n)
    log.info("Rows: %d Cols: %d", images.shape[1], images.shape[2])
    with open_db(db_path, backend, mode="new") as db:
        for start in range(0, n, COMMIT_EVERY):
            batch = images[start : min(n, start + COMMIT_EVERY)]
            txn = db.transaction()
            for i, image in enumerate(batch, start):
                if resize:  # one image at a time: the resize then stays in the CPU's cache
                    image = resize_linear(image[None], resize, resize)[0]
                pixels = np.broadcast_to(image, (3 if color else 1, *image.shape))
                txn.put(f"{i:08d}", array_to_datum(pixels, labels[i]).SerializeToString())
            txn.commit()
            progress(len(batch))
    log.info("Processed %d files.", n)
    return n


# ---- db_info ----------------------------------------------------------------------------------


def db_info(db_path: str, backend: str | None = None, progress=no_progress) -> dict:
    """Count, backend, Datum shapes, storage kinds (raw uint8, float, encoded format) and the
    label histogram, from one pass over the records (encoded images: headers only)."""

    shapes, kinds, labels = Counter(), Counter(), Counter()
    with open_db(db_path, backend) as db:
        info = {"path": db_path, "backend": db.backend, "count": len(db)}
        first_key = None
        for key, value in db:
            first_key = first_key or key
            datum = parse_datum(value, key)
            labels[datum.label] += 1
            if datum.encoded:
                shape, kind = _encoded_shape(datum.data, key)
            else:
                shape = (datum.channels, datum.height, datum.width)
                kind = "raw uint8" if datum.data else "float_data"
            shapes[shape] += 1
            kinds[kind] += 1
            progress(1)
    info.update(first_key=first_key, shapes=shapes, kinds=kinds, labels=labels)
    return info


def _unchanged_channels(image) -> int:
    """The channels cv::imdecode(IMREAD_UNCHANGED) gives, from the header Pillow reads: alpha
    (a palette's transparency included) adds a fourth, grey with alpha decodes as BGRA."""
    if image.mode == "P":
        return 4 if "transparency" in image.info else 3
    if image.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        return 4
    return 1 if image.mode in ("1", "L", "I", "I;16", "I;16B", "F") else 3


def _encoded_shape(data, key):
    try:
        with Image.open(io.BytesIO(data)) as image:  # the header only: no decoding
            shape = (_unchanged_channels(image), image.height, image.width)
            return shape, f"encoded {image.format}"
    except Exception:
        raise CaffeAlexError(
            f"record '{key.decode(errors='replace')}': the encoded image cannot be decoded"
        ) from None


def info_lines(info: dict) -> list[str]:
    def listing(counter, fmt=str):
        return ", ".join(f"{fmt(k)}: {v}" for k, v in sorted(counter.items()))

    return [
        f"database: {info['path']} ({info['backend']})",
        f"records: {info['count']}",
        f"first key: {info['first_key'].decode(errors='replace') if info['first_key'] else '-'}",
        "shape (C x H x W): " + listing(info["shapes"], lambda s: "x".join(map(str, s))),
        "storage: " + listing(info["kinds"]),
        "labels: " + listing(info["labels"]),
    ]
