"""The real Fashion-MNIST (Debian's dataset-fashion-mnist) through convert-mnist into LMDB:
60000/10000 records with exactly 6000/1000 images per class, pixels and labels intact."""

import os
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.data.datum import datum_to_array, parse_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.tools import db_info, read_idx

pytestmark = pytest.mark.slow  # converts the whole dataset

ROOT = Path("/usr/share/datasets/fashion-mnist")
SPLITS = {"train": 60000, "t10k": 10000}


def _files(split):
    images = ROOT / f"{split}-images-idx3-ubyte.gz"
    labels = ROOT / f"{split}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        if os.environ.get("CI"):
            pytest.fail(f"CI: Fashion-MNIST is missing from {ROOT} (apt dataset-fashion-mnist)")
        pytest.skip(f"Fashion-MNIST is not installed in {ROOT} (apt dataset-fashion-mnist)")
    return str(images), str(labels)


@pytest.mark.parametrize("split", SPLITS)
def test_convert_fashion_mnist(tmp_path, split):
    images, labels = _files(split)
    out = str(tmp_path / f"{split}_lmdb")
    start = time.perf_counter()
    result = CliRunner().invoke(main, ["convert-mnist", images, labels, out])
    seconds = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert seconds < 30, f"{SPLITS[split]} images took {seconds:.1f} s"
    info = db_info(out)
    n = SPLITS[split]
    assert info["count"] == n and info["shapes"] == {(1, 28, 28): n}
    assert info["labels"] == {c: n // 10 for c in range(10)}
    assert info["kinds"] == {"raw uint8": n}
    pixels, classes = read_idx(images, 2051), read_idx(labels, 2049)
    with open_db(out) as db:
        for i in (0, 1, n // 2, n - 1):
            datum = parse_datum(db.get(f"{i:08d}"))
            assert datum.label == classes[i]
            assert np.array_equal(datum_to_array(datum)[0], pixels[i])


def test_fashion_mnist_for_alexnet(tmp_path):
    images, labels = _files("t10k")
    out = str(tmp_path / "alexnet_lmdb")
    result = CliRunner().invoke(
        main, ["convert-mnist", "--resize", "227", "--color", "--limit", "64", images, labels, out]
    )
    assert result.exit_code == 0, result.output
    info = db_info(out)
    assert info["count"] == 64 and info["shapes"] == {(3, 227, 227): 64}
    classes = read_idx(labels, 2049)[:64]
    assert info["labels"] == {c: int((classes == c).sum()) for c in np.unique(classes)}
