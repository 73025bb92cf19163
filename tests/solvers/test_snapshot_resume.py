"""Snapshots (names, formats, atomic writes) and resume: 2N iterations in one run give the same
weights, bit for bit, as N iterations, a snapshot, and N more after restoring it."""

from __future__ import annotations

import os

import h5py
import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.formats.prototxt import parse_solver_text
from caffe_alex.proto import caffe_pb2
from caffe_alex.solvers import Solver, snapshot

from .helpers import batches, make_solver, tiny_net

NET = """
name: "resumable"
layer { name: "data" type: "HDF5Data" top: "x" top: "y"
        hdf5_data_param { source: "%s" batch_size: 4 shuffle: true } }
layer { name: "drop" type: "Dropout" bottom: "x" top: "xd" dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip" type: "InnerProduct" bottom: "xd" top: "out"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def _data(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["x"] = rng.normal(size=(10, 5)).astype(np.float32)  # 10 rows: batches wrap around
        f["y"] = rng.normal(size=(10, 2)).astype(np.float32)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{path}\n")
    return listing


def _solver(tmp_path, kind, fmt, seed=5, test=False):
    extra = {"SGD": "momentum: 0.9", "Adam": "momentum: 0.9 momentum2: 0.99"}[kind]
    tests = "test_iter: 2 test_interval: 3 test_compute_loss: true" if test else ""
    text = f"""net_param {{ {NET % _data(tmp_path)} }}
        type: "{kind}" {extra} base_lr: 0.05 lr_policy: "multistep" gamma: 0.5
        stepvalue: 2 stepvalue: 5 weight_decay: 0.001 max_iter: 8 display: 2 {tests}
        snapshot_prefix: "{tmp_path}/snap" snapshot_format: {fmt} random_seed: {seed}
        solver_mode: CPU"""
    return Solver(parse_solver_text(text))


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
@pytest.mark.parametrize("kind", ["SGD", "Adam"])
def test_resume_is_bit_identical(tmp_path, kind, fmt):
    straight = _solver(tmp_path, kind, fmt, test=True)
    straight.step(8)
    first = _solver(tmp_path, kind, fmt, test=True)
    first.step(4)
    model, state = first.snapshot()
    suffix = ".h5" if fmt == "HDF5" else ""
    assert model == f"{tmp_path}/snap_iter_4.caffemodel{suffix}"
    assert state == f"{tmp_path}/snap_iter_4.solverstate{suffix}"
    torch.manual_seed(1234)  # the resumed run must not depend on the RNG state it starts with
    resumed = _solver(tmp_path, kind, fmt, seed=99, test=True)
    resumed.restore(state)
    assert (resumed.iter, resumed.current_step) == (4, 1)
    resumed.step(4)
    for a, b in zip(straight.learnable, resumed.learnable):
        assert torch.equal(a.param, b.param)
    for a, b in zip(straight.rule.history, resumed.rule.history):
        assert torch.equal(a, b)
    assert straight.current_step == resumed.current_step == 2


def test_random_seed_unset_still_resumes(tmp_path):
    # random_seed -1: the feed seed and torch's RNG come back from the saved data position
    first = _solver(tmp_path, "SGD", "BINARYPROTO", seed=-1)
    first.step(3)
    weights = [p.param.detach().clone() for p in first.learnable]
    _, state = first.snapshot()
    first.step(3)
    resumed = _solver(tmp_path, "SGD", "BINARYPROTO", seed=-1)
    resumed.restore(state)
    for p, w in zip(resumed.learnable, weights):
        assert torch.equal(p.param, w)
    resumed.step(3)
    for a, b in zip(first.learnable, resumed.learnable):
        assert torch.equal(a.param, b.param)


def test_solverstate_is_caffes_message(tmp_path):
    solver = _solver(tmp_path, "Adam", "BINARYPROTO")
    solver.step(3)
    model, path = solver.snapshot()
    message = caffe_pb2.SolverState.FromString(open(path, "rb").read())
    assert (message.iter, message.current_step, message.learned_net) == (3, 1, model)
    assert len(message.history) == 4  # Adam: m for weight and bias, then v for both
    expected = [tuple(p.param.shape) for p in solver.learnable] * 2
    assert [tuple(h.shape.dim) for h in message.history] == expected
    np.testing.assert_array_equal(
        np.array(message.history[2].data).reshape(expected[2]), solver.rule.history[2].numpy()
    )
    assert os.path.exists(path + ".data.json")


def test_hdf5_solverstate_layout(tmp_path):
    solver = _solver(tmp_path, "SGD", "HDF5")
    solver.step(2)
    model, path = solver.snapshot()
    with h5py.File(path, "r") as f:
        assert f["iter"].shape == (1,) and f["iter"][0] == 2
        assert f["current_step"][0] == 0
        assert f["learned_net"][()].decode().rstrip("\0") == model
        assert sorted(f["history"]) == ["0", "1"]
    assert os.path.exists(str(tmp_path / "snap_iter_2.solverstate.data.json"))
    with h5py.File(model, "r") as f:
        assert sorted(f["data"]) == ["data", "drop", "ip", "loss"]


def test_snapshot_interval_and_after_train(tmp_path):
    text = (f"snapshot: 4 snapshot_prefix: '{tmp_path}/s' max_iter: 6 base_lr: 0.1 "
            "lr_policy: 'fixed'")  # fmt: skip
    solver = make_solver(tiny_net(), text, batches(10))
    solver.solve()
    names = sorted(os.listdir(tmp_path))
    assert names == sorted(
        f"s_iter_{n}{ext}" for n in (4, 6)
        for ext in (".caffemodel", ".solverstate", ".solverstate.data.json")
    )  # fmt: skip


def test_snapshot_write_is_atomic(tmp_path, monkeypatch):
    solver = make_solver(tiny_net(), f"snapshot_prefix: '{tmp_path}/a' base_lr: 0.1 "
                         "lr_policy: 'fixed' momentum: 0.9", batches(10))  # fmt: skip
    solver.step(2)
    solver.snapshot()
    good = open(tmp_path / "a_iter_2.solverstate", "rb").read()
    calls = []

    def failing(array):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return original(array)

    original = snapshot._history_pieces
    monkeypatch.setattr(snapshot, "_history_pieces", failing)
    with pytest.raises(CaffeAlexError, match="disk full"):
        solver.snapshot()  # same iteration: would overwrite the good file
    assert open(tmp_path / "a_iter_2.solverstate", "rb").read() == good
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_restore_without_data_position_skips_batches(tmp_path):
    # a state written by Caffe has no data position: the train data skips iter*iter_size
    data = batches(30)
    text = f"snapshot_prefix: '{tmp_path}/c' base_lr: 0.1 lr_policy: 'fixed' momentum: 0.9"
    straight = make_solver(tiny_net(), text + " iter_size: 2", data)
    straight.step(6)
    first = make_solver(tiny_net(), text + " iter_size: 2", data)
    first.step(3)
    _, state = first.snapshot()
    os.remove(state + ".data.json")
    resumed = make_solver(tiny_net(), text + " iter_size: 2", data)
    resumed.restore(state)
    resumed.step(3)
    for a, b in zip(straight.learnable, resumed.learnable):
        assert torch.equal(a.param, b.param)


def test_test_nets_share_the_train_weights(tmp_path):
    solver = _solver(tmp_path, "SGD", "BINARYPROTO", test=True)
    train, test = solver.train_net, solver.test_nets[0]
    assert test.params["ip"][0] is train.params["ip"][0]
    assert test.learnable_params()[0].param is train.params["ip"][0]
    solver.step(1)
    result = solver.test(0)
    assert set(result) == {"loss"}
