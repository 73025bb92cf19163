"""The dataset tools and their commands: convert-imageset, compute-image-mean, convert-mnist
(on small synthetic IDX files) and db-info, read back through caffe_alex.data.db."""

import gzip
import logging
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.data.datum import datum_to_array, encode_image, parse_datum
from caffe_alex.data.db import open_db
from caffe_alex.data.tools import (
    compute_image_mean,
    convert_imageset,
    convert_mnist,
    db_info,
    read_list_file,
)
from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.caffemodel import read_binaryproto
from tests.data.full_disk import entries, kill_midway, small_file_system
from tests.paths import ROOT

RNG = np.random.default_rng(0)
BACKENDS = ["lmdb", "leveldb"]


@pytest.fixture
def caplog(caplog):
    """The caffe_alex logger does not propagate once the CLI set it up: attach caplog to it."""
    logger = logging.getLogger("caffe_alex")
    logger.addHandler(caplog.handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(old)


@pytest.fixture
def images(tmp_path):
    """Five 3-channel images (one with a space in its name, one JPEG), and their list file."""
    root = tmp_path / "imgs"
    root.mkdir()
    names = ["a.png", "b c.png", "d.jpg", "e.png", "f.png"]
    arrays = {}
    for name in names:
        a = RNG.integers(0, 256, (3, 12, 16), dtype=np.uint8)
        (root / name).write_bytes(encode_image(a, "jpg" if name.endswith("jpg") else "png"))
        arrays[name] = cv2.imread(str(root / name)).transpose(2, 0, 1)  # OpenCV's pixels
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{n} {i}\n" for i, n in enumerate(names)))
    return str(root) + "/", str(listing), arrays


def _records(path):
    with open_db(path) as db:
        return [(k.decode(), parse_datum(v, k)) for k, v in db]


@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_imageset_raw(images, tmp_path, backend):
    root, listing, arrays = images
    out = str(tmp_path / "db")
    assert convert_imageset(root, listing, out, backend=backend, check_size=True) == 5
    records = _records(out)
    assert [k for k, _ in records] == [f"{i:08d}_{n}" for i, n in enumerate(arrays)]
    for (_, datum), (name, want) in zip(records, arrays.items()):
        assert not datum.encoded and datum.label == list(arrays).index(name)
        got = datum_to_array(datum).astype(int)
        assert np.abs(got - want).max() <= (1 if name.endswith("jpg") else 0)  # BGR as OpenCV


def test_convert_imageset_resize_gray(images, tmp_path):
    root, listing, arrays = images
    out = str(tmp_path / "db")
    convert_imageset(root, listing, out, resize_height=7, resize_width=9, gray=True)
    for key, datum in _records(out):
        gray = cv2.imread(root + key[9:], cv2.IMREAD_GRAYSCALE)
        want = cv2.resize(gray, (9, 7), interpolation=cv2.INTER_LINEAR)
        got = datum_to_array(datum)
        assert got.shape == (1, 7, 9) and np.abs(got[0].astype(int) - want).max() <= 2


def test_convert_imageset_shuffle_keys(images, tmp_path):
    root, listing, arrays = images
    out = str(tmp_path / "db")
    convert_imageset(root, listing, out, shuffle=True, seed=3)
    records = _records(out)
    names = [k[9:] for k, _ in records]
    assert sorted(names) == sorted(arrays) and names != list(arrays)
    assert [int(k[:8]) for k, _ in records] == list(range(5))
    for key, datum in records:  # each label still goes with its image
        assert datum.label == list(arrays).index(key[9:])


def test_convert_imageset_encoded(images, tmp_path):
    root, listing, arrays = images
    out = str(tmp_path / "db")
    convert_imageset(root, listing, out, encoded=True)
    for key, datum in _records(out):
        name = key[9:]
        assert datum.encoded
        with open(root + name, "rb") as f:
            assert datum.data == f.read()  # the file's own bytes: its type matches
    out2 = str(tmp_path / "db2")
    convert_imageset(root, listing, out2, encode_type="png", resize_height=6, resize_width=8)
    for _key, datum in _records(out2):
        assert datum.encoded and datum.data[:4] == b"\x89PNG"
        assert datum_to_array(datum).shape == (3, 6, 8)


def test_convert_imageset_bad_input(images, tmp_path, caplog):
    root, listing, arrays = images
    (tmp_path / "imgs" / "broken.png").write_bytes(b"garbage")
    bad = tmp_path / "bad.txt"
    bad.write_text("a.png 0\nbroken.png 1\nmissing.png 2\ne.png 3\n")
    assert convert_imageset(root, str(bad), str(tmp_path / "db")) == 2  # skipped, as Caffe
    assert "broken.png" in caplog.text and "missing.png" in caplog.text
    nolabel = tmp_path / "nolabel.txt"
    nolabel.write_text("a.png 0\nb.png\n")
    with pytest.raises(CaffeAlexError, match=r"nolabel.txt:2: no label"):
        read_list_file(str(nolabel))
    with pytest.raises(CaffeAlexError, match="nope.txt"):
        convert_imageset(root, str(tmp_path / "nope.txt"), str(tmp_path / "db3"))
    (tmp_path / "imgs" / "small.png").write_bytes(encode_image(np.zeros((3, 4, 4), np.uint8)))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.png 0\nsmall.png 1\n")
    with pytest.raises(CaffeAlexError, match=r"\(3, 4, 4\).*\(3, 12, 16\)"):
        convert_imageset(root, str(mixed), str(tmp_path / "db4"), check_size=True)
    with pytest.raises(CaffeAlexError, match="already exists"):
        convert_imageset(root, listing, str(tmp_path / "db"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_compute_image_mean(images, tmp_path, backend, caplog):
    root, listing, arrays = images
    out = str(tmp_path / "db")
    convert_imageset(root, listing, out, backend=backend)
    mean, channels = compute_image_mean(out, str(tmp_path / "mean.binaryproto"), backend)
    stack = np.stack([datum_to_array(d) for _, d in _records(out)]).astype(np.float64)
    assert np.allclose(mean, stack.mean(0), rtol=1e-6)
    assert np.allclose(channels, stack.mean((0, 2, 3)), rtol=1e-5)
    stored = read_binaryproto(str(tmp_path / "mean.binaryproto"))
    assert stored.shape == (1, 3, 12, 16) and np.array_equal(stored[0], mean)
    assert "mean_value channel [2]:" in caplog.text


def test_compute_image_mean_encoded_and_mismatch(images, tmp_path):
    root, listing, arrays = images
    convert_imageset(root, listing, str(tmp_path / "enc"), encoded=True)
    mean, _ = compute_image_mean(str(tmp_path / "enc"))
    assert mean.shape == (3, 12, 16)
    (tmp_path / "imgs" / "small.png").write_bytes(encode_image(np.zeros((3, 4, 4), np.uint8)))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("a.png 0\nsmall.png 1\n")
    convert_imageset(root, str(mixed), str(tmp_path / "mixed_db"))
    with pytest.raises(CaffeAlexError, match=r"00000001_small.png.*\(3, 4, 4\).*\(3, 12, 16\)"):
        compute_image_mean(str(tmp_path / "mixed_db"))


def _idx(tmp_path, n=30, gz=True):
    images = RNG.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = RNG.integers(0, 10, n, dtype=np.uint8)
    img = struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes()
    lab = struct.pack(">II", 2049, n) + labels.tobytes()
    opener = gzip.compress if gz else bytes
    (tmp_path / "img.idx").write_bytes(opener(img))
    (tmp_path / "lab.idx").write_bytes(opener(lab))
    return str(tmp_path / "img.idx"), str(tmp_path / "lab.idx"), images, labels


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_mnist(tmp_path, gz, backend):
    img, lab, images, labels = _idx(tmp_path, gz=gz)
    out = str(tmp_path / "db")
    assert convert_mnist(img, lab, out, backend=backend) == 30
    records = _records(out)
    assert [k for k, _ in records] == [f"{i:08d}" for i in range(30)]
    for i, (_, datum) in enumerate(records):
        assert datum.label == labels[i]
        assert np.array_equal(datum_to_array(datum), images[i][None])


def test_convert_mnist_resize_color(tmp_path):
    img, lab, images, labels = _idx(tmp_path, n=5)
    out = str(tmp_path / "db")
    assert convert_mnist(img, lab, out, resize=227, color=True, limit=3) == 3
    records = _records(out)
    assert len(records) == 3
    for i, (_, datum) in enumerate(records):
        got = datum_to_array(datum)
        want = cv2.resize(images[i], (227, 227), interpolation=cv2.INTER_LINEAR)
        assert got.shape == (3, 227, 227) and np.array_equal(got[0], got[2])
        assert np.abs(got[1].astype(int) - want).max() <= 1


def test_convert_mnist_bad_files(tmp_path):
    img, lab, *_ = _idx(tmp_path)
    with pytest.raises(CaffeAlexError, match="is not an IDX image file"):
        convert_mnist(lab, lab, str(tmp_path / "db"))
    with pytest.raises(CaffeAlexError, match="nofile"):
        convert_mnist(str(tmp_path / "nofile"), lab, str(tmp_path / "db"))
    img2, lab2, *_ = _idx(tmp_path / ".." / tmp_path.name, n=30)
    short = struct.pack(">II", 2049, 4) + bytes(4)
    (tmp_path / "short.idx").write_bytes(short)
    with pytest.raises(CaffeAlexError, match="30 images.*but 4 labels"):
        convert_mnist(img2, str(tmp_path / "short.idx"), str(tmp_path / "db"))
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(CaffeAlexError, match="bad.gz' is not a readable gzip file"):
        convert_mnist(str(tmp_path / "bad.gz"), lab, str(tmp_path / "db"))
    (tmp_path / "cut.idx").write_bytes(struct.pack(">II", 2051, 5))
    with pytest.raises(CaffeAlexError, match="truncated inside its IDX header"):
        convert_mnist(str(tmp_path / "cut.idx"), lab, str(tmp_path / "db"))


def test_db_info_and_cli(images, tmp_path):
    root, listing, arrays = images
    runner = CliRunner()
    out = str(tmp_path / "db")
    result = runner.invoke(
        main, ["convert-imageset", "-backend", "leveldb", "--encoded", root, listing, out]
    )
    assert result.exit_code == 0, result.output
    info = db_info(out)
    assert info["backend"] == "leveldb" and info["count"] == 5
    assert info["kinds"] == {"encoded PNG": 4, "encoded JPEG": 1}
    result = runner.invoke(main, ["db-info", out])
    assert result.exit_code == 0, result.output
    assert "records: 5" in result.output and "3x12x16: 5" in result.output
    assert "labels: 0: 1, 1: 1, 2: 1, 3: 1, 4: 1" in result.output
    mean = str(tmp_path / "m.binaryproto")
    result = runner.invoke(main, ["compute-image-mean", "-backend", "leveldb", out, mean])
    assert result.exit_code == 0, result.output
    assert read_binaryproto(mean).shape == (1, 3, 12, 16)
    result = runner.invoke(main, ["db-info", str(tmp_path / "absent")])
    assert result.exit_code == 1 and "absent" in result.output
    img, lab, *_ = _idx(tmp_path, n=4)
    result = runner.invoke(
        main, ["convert-mnist", "-resize", "32", "-color", img, lab, str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert db_info(str(tmp_path / "m"))["shapes"] == {(3, 32, 32): 4}


# ---- full disks and interrupted conversions ---------------------------------------------------


def _cli_process(*args) -> subprocess.CompletedProcess:
    """The command line in a fresh process: a crash (SIGBUS) shows as a negative return code."""
    return subprocess.run([sys.executable, "-m", "caffe_alex", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)  # fmt: skip


@pytest.mark.subprocess
@pytest.mark.parametrize("fill", [True, False], ids=["full before", "full part-way"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_convert_mnist_onto_a_full_disk(tmp_path, backend, fill):
    img, lab, *_ = _idx(tmp_path, n=4000, gz=False)  # 3 MB of records for a 2 MB file system
    with small_file_system(tmp_path / "full", fill=fill) as folder:
        out = folder / "mnist_db"
        result = _cli_process("convert-mnist", "--backend", backend, img, lab, str(out))
        assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
        assert result.stderr.splitlines()[-1] == (
            f"caffe-alex: error: cannot write {out}: No space left on device"
        )
        assert entries(folder) == []  # the partial database is gone


def test_convert_imageset_and_image_mean_onto_a_full_disk(images, tmp_path):
    root, listing, _ = images
    convert_imageset(root, listing, str(tmp_path / "db"))
    with small_file_system(tmp_path / "full", fill=True) as folder:
        with pytest.raises(CaffeAlexError, match=r"cannot write .*/imgs_db: No space left"):
            convert_imageset(root, listing, str(folder / "imgs_db"))
        mean = folder / "mean.binaryproto"
        with pytest.raises(CaffeAlexError, match=f"^cannot write {mean}: No space left"):
            compute_image_mean(str(tmp_path / "db"), str(mean))
        assert entries(folder) == []


STALL_AFTER_ONE_COMMIT = """
import sys, time
from caffe_alex.data import db
commit = db.Transaction.commit
def stall(self):
    commit(self)
    print("writing", flush=True)
    time.sleep(300)
db.Transaction.commit = stall
from caffe_alex.data.tools import convert_mnist
convert_mnist(*sys.argv[1:])
"""


@pytest.mark.subprocess
def test_kill_during_convert_mnist_leaves_no_database_and_the_next_run_cleans_up(tmp_path):
    img, lab, images, labels = _idx(tmp_path, n=2500)
    out = tmp_path / "mnist_db"
    args = ", ".join(repr(str(p)) for p in (img, lab, out))
    pid = kill_midway(STALL_AFTER_ONE_COMMIT.replace("*sys.argv[1:]", args))
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".mnist_db")]
    assert left.name.startswith(f".mnist_db.caffe-alex-{pid}-") and left.is_dir()
    assert not out.exists()  # never a partial database under the name
    assert convert_mnist(img, lab, str(out)) == 2500  # the same command again
    assert not left.exists()
    records = _records(str(out))
    assert len(records) == 2500 and records[-1][1].label == labels[-1]
