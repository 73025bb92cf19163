"""HDF5Output: bottoms written as Caffe's layer writes them ("data" and "label", 4-D, float),
each forward atomically: a run killed mid-write leaves the file of the earlier batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
from tests.data.full_disk import kill_midway
from tests.reference import parse_net

h5py = pytest.importorskip("h5py")


def output_net(path, data_shape=(2, 3, 4, 5), label_shape=(2,)):
    shapes = " ".join(
        "shape { " + " ".join(f"dim: {d}" for d in s) + " }" for s in (data_shape, label_shape)
    )
    text = f"""
    layer {{ name: "in" type: "Input" top: "x" top: "y" input_param {{ {shapes} }} }}
    layer {{ name: "out" type: "HDF5Output" bottom: "x" bottom: "y"
             hdf5_output_param {{ file_name: "{path}" }} }}"""
    return Net(parse_net(text), "TEST")


@pytest.mark.parametrize(
    "data_shape,label_shape,stored",
    [
        ((2, 3, 4, 5), (2,), ((2, 3, 4, 5), (2, 1, 1, 1))),
        ((3, 7), (3, 2), ((3, 7, 1, 1), (3, 2, 1, 1))),
    ],
)
def test_writes_data_and_label_and_appends(tmp_path, data_shape, label_shape, stored):
    path = tmp_path / "out.h5"
    net = output_net(path, data_shape, label_shape)
    assert not path.exists()  # created at the first forward, not when the net is built
    batches = [(torch.randn(data_shape), torch.randn(label_shape)) for _ in range(3)]
    for x, y in batches:
        assert net(x=x, y=y) == {}
    with h5py.File(path, "r") as h5:
        assert set(h5) == {"data", "label"} and h5["data"].dtype == np.float32
        for name, index, shape in (("data", 0, stored[0]), ("label", 1, stored[1])):
            want = np.concatenate([b[index].numpy().reshape(shape) for b in batches])
            np.testing.assert_array_equal(h5[name][:], want)
    fresh = output_net(path, data_shape, label_shape)  # a new net replaces the file
    fresh(x=batches[0][0], y=batches[0][1])
    with h5py.File(path, "r") as h5:
        assert h5["data"].shape[0] == data_shape[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"label_shape": (3,)}, "same batch size"),
        ({"data_shape": (2, 1, 1, 1, 1)}, "at most 4 axes"),
    ],
)
def test_bad_shapes(tmp_path, kwargs, message):
    with pytest.raises(CaffeAlexError, match=rf"layer 'out' \(HDF5Output\).*{message}"):
        output_net(tmp_path / "o.h5", **kwargs)


def test_needs_a_file_name():
    text = """layer { name: "in" type: "Input" top: "x" top: "y"
                      input_param { shape { dim: 1 } shape { dim: 1 } } }
              layer { name: "out" type: "HDF5Output" bottom: "x" bottom: "y" }"""
    with pytest.raises(CaffeAlexError, match="file_name is required"):
        Net(parse_net(text), "TEST")


def test_a_failed_write_is_one_line_naming_the_layer_and_file(tmp_path):
    path = tmp_path / "no_such_folder" / "out.h5"
    net = output_net(path)
    with pytest.raises(CaffeAlexError) as info:
        net(x=torch.zeros(2, 3, 4, 5), y=torch.zeros(2))
    assert str(info.value) == (
        f"layer 'out' (HDF5Output): cannot write {path}: No such file or directory"
    )


def test_rows_of_another_shape_are_refused_and_the_file_kept(tmp_path):
    path = tmp_path / "out.h5"
    net = output_net(path, (2, 3), (2,))
    net(x=torch.ones(2, 3), y=torch.ones(2))
    with pytest.raises(CaffeAlexError, match=r"layer 'out' \(HDF5Output\): 'data' rows of shape"):
        net(x=torch.ones(2, 4), y=torch.ones(2))
    with h5py.File(path, "r") as h5:
        assert h5["data"].shape == (2, 3, 1, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]


TWO_FORWARDS_KILLED_IN_THE_SECOND = """
import os, sys, time, torch
from tests.layers.test_hdf5_output import output_net
net = output_net(sys.argv[1], (2, 3), (2,))
net(x=torch.full((2, 3), 1.0), y=torch.zeros(2))
def stall(fd):  # the second batch is in the temporary; the rename has not happened
    print("writing", flush=True)
    time.sleep(300)
os.fsync = stall
net(x=torch.full((2, 3), 2.0), y=torch.zeros(2))
"""


@pytest.mark.subprocess
def test_kill_during_a_forward_leaves_the_earlier_batches_and_the_next_run_cleans_up(tmp_path):
    path = tmp_path / "out.h5"
    code = TWO_FORWARDS_KILLED_IN_THE_SECOND.replace("sys.argv[1]", repr(str(path)))
    pid = kill_midway(code)
    with h5py.File(path, "r") as h5:  # a whole file: the first batch only
        np.testing.assert_array_equal(h5["data"][:], np.ones((2, 3, 1, 1), np.float32))
    (left,) = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert left.name.startswith(f".out.h5.caffe-alex-{pid}-")
    net = output_net(path, (2, 3), (2,))  # the next run: a new net replaces the file
    net(x=torch.zeros(2, 3), y=torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.h5"]
