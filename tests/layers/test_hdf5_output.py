"""HDF5Output: bottoms written as Caffe's layer writes them ("data" and "label", 4-D, float)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.net import Net
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
