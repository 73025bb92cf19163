"""The dataset tools' records equal what Caffe's convert_imageset and convert_mnist write, pixel
for pixel and byte for byte: each compared with OpenCV's own calls (cv2.imread with Caffe's
flags, cv2.resize INTER_LINEAR, cv2.imencode), which is what Caffe runs. (test_tools.py covers
the tools' options and errors.)"""

import gzip
import struct

import cv2
import numpy as np
import pytest

from caffe_alex.data.datum import datum_to_array, encode_image, parse_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.tools import convert_imageset, convert_mnist

RNG = np.random.default_rng(7)


def photo(h, w):
    """Smooth colour with noise, so that JPEG and resizing round in many places."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)])
    return np.clip(base + RNG.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    names = ["a.jpg", "b.png", "c d.jpg"]
    for name, shape in zip(names, [(37, 53), (40, 31), (64, 48)]):
        (root / name).write_bytes(encode_image(photo(*shape), name.rpartition(".")[2]))
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    return f"{root}/", str(listing), names


def records(path):
    with open_db(path) as db:
        return [parse_datum(v, k) for k, v in db]


def chw(image):
    return image[None] if image.ndim == 2 else image.transpose(2, 0, 1)


@pytest.mark.parametrize("gray", [False, True])
@pytest.mark.parametrize("size", [(0, 0), (29, 33)])
def test_raw_records_equal_opencv(folder, tmp_path, gray, size):
    root, listing, names = folder
    out = str(tmp_path / "db")
    convert_imageset(root, listing, out, resize_height=size[0], resize_width=size[1], gray=gray)
    for name, datum in zip(names, records(out)):
        image = cv2.imread(root + name, cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
        if size[0]:
            image = cv2.resize(image, size[::-1], interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(datum_to_array(datum), chw(image), err_msg=name)


def test_encoded_records_equal_opencv(folder, tmp_path):
    root, listing, names = folder
    out = str(tmp_path / "db")
    convert_imageset(root, listing, out, resize_height=20, resize_width=24, encode_type="jpg")
    for name, datum in zip(names, records(out)):
        image = cv2.resize(cv2.imread(root + name), (24, 20), interpolation=cv2.INTER_LINEAR)
        assert datum.encoded and datum.data == cv2.imencode(".jpg", image)[1].tobytes()
    kept = str(tmp_path / "kept")
    convert_imageset(root, listing, kept, encoded=True)  # no resize: the files' own bytes
    for name, datum in zip(names, records(kept)):
        assert datum.data == (tmp_path / "imgs" / name).read_bytes()


def test_mnist_resized_equals_opencv(tmp_path):
    images = RNG.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    (tmp_path / "img").write_bytes(
        gzip.compress(struct.pack(">IIII", 2051, 4, 28, 28) + images.tobytes())
    )
    (tmp_path / "lab").write_bytes(gzip.compress(struct.pack(">II", 2049, 4) + bytes(4)))
    out = str(tmp_path / "db")
    convert_mnist(str(tmp_path / "img"), str(tmp_path / "lab"), out, resize=227, color=True)
    for image, datum in zip(images, records(out)):
        want = cv2.resize(image, (227, 227), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(datum_to_array(datum), np.stack([want] * 3))
