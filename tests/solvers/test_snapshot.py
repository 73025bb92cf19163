"""Solver state files with hostile contents (.solverstate, .solverstate.h5 and the .data.json
beside them): every field is checked before the solver uses it, and each problem is one line
naming the file."""

from __future__ import annotations

import base64
import json

import h5py
import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.wire import encode_varint, key, length_delimited
from caffe_alex.proto import caffe_pb2
from caffe_alex.solvers import snapshot
from tests.data.full_disk import small_file_system


def _varint_field(number: int, value: int) -> bytes:
    return key(number, 0) + encode_varint(value)


def _history(proto: caffe_pb2.BlobProto) -> bytes:
    return length_delimited(3, proto.SerializeToString())


BINARY = [  # (file content, what the error says)
    (_varint_field(1, (1 << 64) - 5), "iter is -5, not a count"),
    (_varint_field(1, 1 << 31), "iter is -2147483648, not a count"),  # as an int32 reads it
    (_varint_field(1, 3) + _varint_field(4, (1 << 64) - 1), "current_step is -1, not a count"),
    (_varint_field(1, 3) + length_delimited(2, b"a\0b"), "learned_net holds a NUL byte"),
    (_varint_field(1, 3) + _history(caffe_pb2.BlobProto(num=-1, channels=1, height=1, width=1)),
     "blob of shape [-1, 1, 1, 1]: dimension -1 out of range"),
    (_varint_field(1, 3) + _history(caffe_pb2.BlobProto(shape=caffe_pb2.BlobShape(dim=[3]),
                                                        data=[1.0])),
     "blob of shape [3] holds 1 values"),
    (bytes([0x0F]) + bytes(20), "invalid wire type 7"),
    (_varint_field(9, 1), "unexpected field 9"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "reason"), BINARY)
def test_binary_state_fields_are_checked(tmp_path, content, reason):
    path = tmp_path / "s.solverstate"
    path.write_bytes(content)
    with pytest.raises(CaffeAlexError) as info:
        snapshot.read_state(path)
    assert str(info.value).startswith(f"{path}: ") and reason in str(info.value)


def test_binary_state_keeps_a_learned_net_path_that_is_not_utf8(tmp_path):
    path = tmp_path / "s.solverstate"
    path.write_bytes(_varint_field(1, 3) + length_delimited(2, b"w\xff.caffemodel"))
    state = snapshot.read_state(path)
    assert state.iter == 3 and state.learned_net.encode("utf-8", "surrogateescape") == (
        b"w\xff.caffemodel"
    )


def _good(f):
    f.create_dataset("iter", data=np.array([5], np.int32))
    f.create_dataset("current_step", data=np.array([0], np.int32))
    f.create_group("history")


def _and(*builds):
    def build(f):
        for b in builds:
            b(f)

    return build


def _replace(name, data=None, group=False):
    def build(f):
        del f[name]
        if group:
            f.create_group(name)
        else:
            f.create_dataset(name, data=data)

    return build


HDF5 = [  # (how the file is made after a good one, what the error says)
    (_replace("iter", np.array([b"x"])), "'iter' is not one number"),
    (_replace("iter", np.zeros(0)), "'iter' is not one number"),
    (_replace("iter", np.array([1, 2])), "'iter' is not one number"),
    (_replace("iter", group=True), "'iter' is not a dataset"),
    (_replace("iter", [-4]), "iter is -4, not a count"),
    (_replace("iter", [4.5]), "'iter' is 4.5, not an int32"),
    (_replace("iter", [2.0**40]), "not an int32"),
    (_replace("current_step", [np.nan]), "'current_step' is nan, not an int32"),
    (lambda f: f.__delitem__("history"), "no 'history' group"),
    (_replace("history", [1.0]), "no 'history' group"),
    (lambda f: f["history"].create_dataset("a", data=[1.0]), "the history datasets are ['a']"),
    (lambda f: f["history"].create_dataset("1", data=[1.0]), "the history datasets are ['1']"),
    (lambda f: f["history"].create_dataset("0", data=[b"x"]), "'history/0' does not hold num"),
    (lambda f: f["history"].create_group("0"), "'history/0' is not a dataset"),
    (lambda f: f["history"].create_dataset("0", shape=(1 << 16, 1 << 16), dtype="f4",
                                           chunks=(1, 16)),
     "'history/0': blob of shape [65536, 65536] exceeds 2147483647 values"),
    (lambda f: f.create_dataset("learned_net", data=[1, 2]), "'learned_net' is not a string"),
    (lambda f: f.create_dataset("learned_net", data=np.array(b"a\0b\0", "S4")),
     "learned_net holds a NUL byte"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "reason"), HDF5)
def test_hdf5_state_layout_is_checked(tmp_path, build, reason):
    path = tmp_path / "s.solverstate.h5"
    with h5py.File(path, "w") as f:
        _and(_good, build)(f)
    with pytest.raises(CaffeAlexError) as info:
        snapshot.read_state(path)
    text = str(info.value)
    assert text.startswith(f"{path}: ") and reason in text and "\n" not in text


def test_hdf5_state_as_caffe_writes_it_reads(tmp_path):
    path = tmp_path / "s.solverstate.h5"
    state = snapshot.SolverState(7, 2, "w\xff.caffemodel", [np.ones((2, 3), np.float32)])
    snapshot.write_hdf5(path, state)
    back = snapshot.read_state(path)
    assert (back.iter, back.current_step, back.learned_net) == (7, 2, "w\xff.caffemodel")
    np.testing.assert_array_equal(back.history[0], state.history[0])


RNG = base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()
FEED = {"batches": 3, "state": {"position": 3, "seed": 1, "rank": 0, "world_size": 1}}
GOOD = {"version": 1, "feeds": {"train": FEED, "test": [FEED]}, "torch_rng": RNG}


def _doc(**changes):
    doc = json.loads(json.dumps(GOOD))
    for path, value in changes.items():
        *parents, last = path.split("__")
        target = doc
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        target[last] = value
    return doc


DATA = [  # (the document, what the error says)
    ([1], "not version 1 of the format"),
    (_doc(version=2), "not version 1 of the format"),
    (_doc(feeds=[]), "no feeds"),
    (_doc(feeds__train=None), "the train feed has no batch count"),
    (_doc(feeds__train__batches=-1), "the train feed has no batch count"),
    (_doc(feeds__train__state=[1]), "the train feed: its state is not a map"),
    (_doc(feeds__train__state__position=-1), "the train feed: position is not a count"),
    (_doc(feeds__train__state__seed="x"), "the train feed: seed is not a count"),
    (_doc(feeds__train__state__world_size=0), "the train feed: world_size is not a count"),
    (_doc(feeds__train__state__rank=4), "the train feed: rank 4 of a world of 1"),
    (_doc(feeds__test=[5]), "test feed 0 has no batch count"),
    (_doc(feeds__ranks={}), "'ranks' is not a list"),
    (_doc(feeds__ranks=[{"train": FEED}]), "rank 0's torch_rng is not a random generator"),
    (_doc(torch_rng="!!"), "torch_rng is not a random generator state"),
    (_doc(torch_rng="AAAA"), "torch_rng is not a random generator state"),
    (_doc(torch_rng=base64.b64encode(bytes(5056)).decode()), "torch_rng is not a random gen"),
    (_doc(torch_rng=None), "torch_rng is not a random generator state"),
    (_doc(cuda_rng=3), "cuda_rng is not a random generator state"),
]  # fmt: skip


@pytest.mark.parametrize(("doc", "reason"), DATA)
def test_data_position_is_checked(tmp_path, doc, reason):
    path = tmp_path / "s.solverstate.data.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CaffeAlexError, match=f"^{path}: not a saved data position: ") as info:
        snapshot.read_data_state(str(path))
    assert reason in str(info.value)


def test_data_position_that_is_not_json(tmp_path):
    path = tmp_path / "s.solverstate.data.json"
    for text in ["{", "[" * 100000, "\udcff"]:
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(CaffeAlexError, match="cannot read the saved data position: [^\n]+$"):
            snapshot.read_data_state(str(path))
    path.write_text(json.dumps(GOOD))
    before = torch.get_rng_state()
    assert snapshot.read_data_state(str(path)) == GOOD  # checking leaves torch's RNG alone
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", ["s.solverstate", "s.solverstate.h5"])
def test_state_onto_a_full_disk(tmp_path, name):
    state = snapshot.SolverState(1, 0, "w.caffemodel", [np.zeros((1000, 1000), np.float32)])
    write = snapshot.write_hdf5 if name.endswith(".h5") else snapshot.write_binary
    with small_file_system(tmp_path / "full", size="1m") as folder:
        with pytest.raises(CaffeAlexError) as info:
            write(folder / name, state)
        assert str(info.value) == f"cannot write {folder / name}: No space left on device"
        assert list(folder.iterdir()) == []
