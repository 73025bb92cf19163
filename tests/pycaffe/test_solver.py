"""caffe.SGDSolver and friends (caffe_alex.pycaffe.solver): the same training as `caffe-alex
train`, nets that share the solver's data and parameters, and the LeNet notebook's loop."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

import caffe
from caffe_alex.cli import main
from caffe_alex.formats.weights import read_weights
from tests.commands.test_train import write_tiny_problem


@pytest.fixture
def tiny(tmp_path):
    return write_tiny_problem(tmp_path, max_iter=6, snapshot=0)


def test_step_equals_caffe_alex_train(tiny, tmp_path):
    solver = caffe.SGDSolver(str(tiny["solver"]))
    solver.step(6)
    assert solver.iter == 6
    solver.net.save(str(tmp_path / "pycaffe.caffemodel"))
    result = CliRunner().invoke(main, ["train", "--solver", str(tiny["solver"]), "--no-progress"])
    assert result.exit_code == 0, result.output
    ours = {lw.name: lw.blobs for lw in read_weights(tmp_path / "pycaffe.caffemodel").layers}
    cli = {lw.name: lw.blobs for lw in read_weights(tmp_path / "tiny_iter_6.caffemodel").layers}
    # Caffe's Split layers: the test net reads label twice (Accuracy, loss), the train net once
    assert "label_data_1_split" in solver.test_nets[0]._layer_names
    assert "label_data_1_split" not in ours
    for name, blobs in cli.items():
        for a, b in zip(ours[name], blobs):
            np.testing.assert_array_equal(a.data, b.data)


def test_nets_share_the_solvers_data_and_weights(tiny):
    solver = caffe.SGDSolver(str(tiny["solver"]))
    with h5py.File(tiny["prefix"].parent / "tiny.h5") as h5:
        rows = np.asarray(h5["data"])
    solver.net.forward()  # the LeNet notebook: one batch through the train net by hand
    np.testing.assert_array_equal(solver.net.blobs["data"].data, rows[:8])
    solver.step(1)  # ... and the solver's next iteration takes the next batch
    np.testing.assert_array_equal(solver.net.blobs["data"].data, rows[8:16])
    assert np.isfinite(solver.net.blobs["loss"].data) and solver.net.params["ip"][0].diff.any()
    test = solver.test_nets[0]
    test.forward()
    test.forward(start="ip")  # the data blob keeps its batch; the weights are the train net's
    first = test.blobs["ip"].data.copy()
    np.testing.assert_allclose(first, test.blobs["data"].data @ solver.net.params["ip"][0].data.T
                               + solver.net.params["ip"][1].data, rtol=1e-5)  # fmt: skip
    solver.net.params["ip"][0].data[...] = 0
    test.forward(start="ip")
    bias = np.broadcast_to(solver.net.params["ip"][1].data, first.shape)
    np.testing.assert_allclose(test.blobs["ip"].data, bias)


def test_callbacks_type_dispatch_lr_and_snapshots(tiny, tmp_path):
    text = tiny["solver"].read_text().replace("momentum: 0.9", 'type: "Adam" momentum: 0.9')
    (tmp_path / "adam.prototxt").write_text(text)
    solver = caffe.get_solver(str(tmp_path / "adam.prototxt"))
    assert isinstance(solver, caffe.AdamSolver) and solver.type == "Adam"
    assert caffe.SGDSolver(str(tmp_path / "adam.prototxt")).type == "SGD"  # the class decides
    calls = []
    solver.add_callback(lambda: calls.append(("start", solver.iter)),
                        lambda: calls.append(("gradients", solver.iter)))  # fmt: skip
    solver.step(2)
    assert calls == [("start", 0), ("gradients", 0), ("start", 1), ("gradients", 1)]
    assert solver.lr == pytest.approx(0.1)  # step policy: gamma 0.5 every 4 iterations
    solver.snapshot()
    state = tmp_path / "tiny_iter_2.solverstate"
    assert state.is_file()
    again = caffe.get_solver(str(tmp_path / "adam.prototxt"))
    again.restore(str(state))
    assert again.iter == 2
    np.testing.assert_array_equal(again.net.params["ip"][0].data, solver.net.params["ip"][0].data)


def test_share_weights_and_solve(tiny, tmp_path):
    solver = caffe.SGDSolver(str(tiny["solver"]))
    deploy = caffe.Net(str(tiny["net"]), caffe.TEST)
    solver.share_weights(deploy)
    solver.solve()
    assert solver.iter == 6
    np.testing.assert_array_equal(deploy.params["ip"][0].data, solver.net.params["ip"][0].data)
