"""Caffe HDF5 weights files (.caffemodel.h5) with hostile contents: the layout is checked (a
group per layer, datasets named by blob index, numbers only, counts within Caffe's limit)
before anything is read, and each problem is one line naming the file and the dataset."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.hdf5 import write_h5
from caffe_alex.formats.weights import read_weights
from caffe_alex.formats.weightset import MAX_BLOBS


def _dataset(name, data=None, **kwargs):
    return lambda f: f.create_dataset(name, data=data, **kwargs)


def _link(target):
    def build(f):
        f.create_group("data/ip")["0"] = target

    return build


HOSTILE = [  # (how the file is made, what the error says)
    (_dataset("data/ip/0", np.array([b"ab", b"c"])), "data/ip/0 holds string values"),
    (_dataset("data/ip/0", ["ab"], dtype=h5py.string_dtype()), "data/ip/0 holds string values"),
    (_dataset("data/ip/0", np.zeros(2, [("a", "f4"), ("b", "i4")])), "holds compound values"),
    (_dataset("data/ip/0", np.ones(2, np.complex64)), "holds complex values"),
    (_dataset("data/ip/0", h5py.Empty("f4")), "data/ip/0 holds no data"),
    (_dataset("data/ip", np.ones(3)), "data/ip is not a group of blobs"),
    (lambda f: f.create_group("data/" + "/".join(["g"] * 40)), "nested more than 32 deep"),
    (lambda f: f.create_dataset("data/ip/conv/w", data=[1.0]), "data/ip/conv/w: not a blob"),
    (_link(h5py.SoftLink("/nowhere")), "data/ip/0 is not a dataset"),
    (_link(h5py.ExternalLink("/nonexistent.h5", "/x")), "data/ip/0 is not a dataset"),
    (_dataset("data/ip/weights", np.ones(3)), "data/ip/weights: not a blob index"),
    (_dataset("data/ip/01", np.ones(3)), "data/ip/01: not a blob index"),
    (_dataset("data/ip/\u00b2", np.ones(3)), "data/ip/\u00b2: not a blob index"),
    (_dataset("data/ip/99999999999", np.ones(3)), "data/ip/99999999999: not a blob index"),
    (_dataset(f"data/ip/{MAX_BLOBS}", np.ones(3)), f"blob index {MAX_BLOBS} is out of range"),
    (_dataset("data/ip/0", shape=(1 << 20, 1 << 20), dtype="f4", chunks=(1, 16)),
     "holds 1099511627776 values, more than a blob can"),
    (lambda f: f.create_group("other"), "no 'data' group"),
    (_dataset("data", np.ones(3)), "no 'data' group"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), HOSTILE)
def test_hostile_layout_is_one_line_naming_the_file(tmp_path, build, reason):
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        build(f)
    with pytest.raises(CaffeAlexError) as info:
        read_weights(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and reason in text and "\n" not in text


def test_not_hdf5_inside(tmp_path):
    path = tmp_path / "w.caffemodel.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(CaffeAlexError, match=f"^{path}: cannot read HDF5 weights: [^\n]+$"):
        read_weights(path)


def test_numbers_of_other_types_and_names_that_are_not_utf8_are_read(tmp_path):
    path = tmp_path / "w.caffemodel.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("data/ip/0", data=np.arange(6, dtype=np.int16).reshape(2, 3))
        f.create_dataset("data/ip/1", data=np.ones(2, np.float64))
        f["data"].create_group(b"odd\xffname").create_dataset("1", data=np.ones(1, np.float16))
    ws = read_weights(path)
    by_name = {lw.name: lw.blobs for lw in ws.layers}
    weight, bias = by_name["ip"]
    assert weight.data.dtype == np.float32 and weight.shape == (2, 3)
    np.testing.assert_array_equal(weight.data, np.arange(6))
    assert bias.data.dtype == np.float64  # double data is kept, as from a caffemodel
    shared, half = by_name["odd\udcffname"]  # the bytes kept (see formats.weightset.text_of)
    assert shared is None and half.data.dtype == np.float32


def test_layer_names_with_slashes_are_nested_groups_both_ways(tmp_path):
    # GoogLeNet's layers are named like inception_3a/1x1: HDF5 keeps them as nested groups
    path = tmp_path / "w.caffemodel.h5"
    layers = [("inception_3a/1x1", [(np.ones((2, 3)), None), (np.ones(2), None)]),
              ("inception_3a", [(np.zeros(4), None)]),
              ("relu", []),
              ("a/b/c", [(None, None), (np.ones(1), None)])]  # fmt: skip
    write_h5(path, layers)
    got = {lw.name: [None if b is None else b.shape for b in lw.blobs]
           for lw in read_weights(path).layers}  # fmt: skip
    assert got == {"inception_3a": [(4,)], "inception_3a/1x1": [(2, 3), (2,)], "relu": [],
                   "a/b/c": [None, (1,)]}  # fmt: skip


@pytest.mark.parametrize(
    ("names", "reason"),
    [
        (["", "ip"], "the layer name '' cannot name an HDF5 group"),
        (["/ip"], "the layer name '/ip' cannot name an HDF5 group"),
        (["a//b"], "the layer name 'a//b' cannot name an HDF5 group"),
        (["a/./b"], "the layer name 'a/./b' cannot name an HDF5 group"),
        (["ip", "ip"], "two layers are named 'ip'"),
    ],
)
def test_names_that_cannot_be_groups_are_refused_before_writing(tmp_path, names, reason):
    path = tmp_path / "w.caffemodel.h5"
    path.write_bytes(b"old")
    with pytest.raises(CaffeAlexError, match=f"^cannot write {path}: "):
        write_h5(path, [(name, [(np.ones(1), None)]) for name in names])
    with pytest.raises(CaffeAlexError) as info:
        write_h5(path, [(name, [(np.ones(1), None)]) for name in names])
    assert reason in str(info.value)
    assert path.read_bytes() == b"old"
