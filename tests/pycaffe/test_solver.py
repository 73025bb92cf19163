"""caffe.SGDSolver and friends (caffe_alex.pycaffe.solver): the same training as `caffe-alex
train`, nets that share the solver's data and parameters, and the LeNet notebook's loop."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
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


def test_step_keeps_every_blobs_diff_as_caffe_does(tiny):
    """After step, an intermediate blob's diff is the last iteration's gradient of the loss
    with respect to it (Caffe keeps every blob's diff); here: ip's, against autograd of the
    net as one graph on the batch and the weights that iteration used."""
    solver = caffe.SGDSolver(str(tiny["solver"]))
    weights = [b.data.copy() for b in solver.net.params["ip"]]
    seen = []
    solver.net.after_backward(lambda i: seen.append(i))  # called within the iteration
    solver.step(1)
    assert seen == list(range(len(solver.net.layers) - 1, -1, -1))
    data, label = solver.net.blobs["data"].data, solver.net.blobs["label"].data
    ip = torch.tensor(data @ weights[0].T + weights[1], requires_grad=True)
    torch.nn.functional.cross_entropy(ip, torch.tensor(label).long()).backward()
    np.testing.assert_allclose(solver.net.blobs["ip"].diff, ip.grad.numpy(), rtol=1e-5,
                               atol=1e-7)  # fmt: skip
    assert solver.net.blobs["loss"].diff == 1  # the loss weight, as SetLossWeights leaves it


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


# -- several processes, as pycaffe's python/train.py runs them ---------------------------------
# train.py's flow, step for step: a uid made before the processes start; in each, the solver
# count and rank set before the solver is made, then NCCL(solver, uid), bcast(), the NCCL given
# to add_callback and (layer_wise_reduce) to net.after_backward, and step(max_iter).
TRAIN_PY = """
import sys
from multiprocessing import Process

import caffe


def solve(proto, gpus, uid, rank):
    caffe.set_mode_cpu()
    caffe.set_solver_count(len(gpus))
    caffe.set_solver_rank(rank)
    caffe.set_multiprocess(True)
    solver = caffe.SGDSolver(proto)
    nccl = caffe.NCCL(solver, uid)
    nccl.bcast()
    solver.add_callback(nccl)
    if solver.param.layer_wise_reduce:
        solver.net.after_backward(nccl)
    solver.step(solver.param.max_iter)


if __name__ == "__main__":
    gpus = [0, 1]
    uid = caffe.NCCL.new_uid()
    caffe.init_log()
    caffe.log("Using devices %s" % str(gpus))
    procs = [Process(target=solve, args=(sys.argv[1], gpus, uid, r)) for r in range(len(gpus))]
    for p in procs:
        p.daemon = True
        p.start()
    for p in procs:
        p.join()
    sys.exit(max(p.exitcode for p in procs))
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("layer_wise", [True, False])
def test_nccl_trains_as_caffe_alex_train_on_two_gpus(tmp_path, layer_wise):
    """Two processes joined by caffe.NCCL give the weights of one process with iter_size 2
    (the records dealt round robin, the gradients summed and halved), which is what
    `caffe-alex train --gpu 0,1` gives (tests/solvers/test_distributed.py)."""
    import os
    import subprocess
    import sys

    from tests.paths import ROOT

    extra = "" if layer_wise else "layer_wise_reduce: false\n"
    files = write_tiny_problem(tmp_path, max_iter=8, snapshot=8, extra=extra)
    (tmp_path / "train.py").write_text(TRAIN_PY)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    command = [sys.executable, str(tmp_path / "train.py"), str(files["solver"])]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("Snapshotting to binary proto file") == 1  # rank 0 alone
    one = tmp_path / "one_solver.prototxt"
    text = files["solver"].read_text().replace("snapshot: 8", "snapshot: 0")  # writes nothing
    one.write_text(text + "iter_size: 2\n")
    single = caffe.SGDSolver(str(one))
    single.step(8)
    two = {lw.name: lw.blobs for lw in read_weights(tmp_path / "tiny_iter_8.caffemodel").layers}
    for a, b in zip(two["ip"], single.net.params["ip"]):
        want = b.data
        np.testing.assert_allclose(a.data.reshape(want.shape), want, rtol=1e-5, atol=1e-6)


BRANCHY_NET = """name: "branchy"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param { source: "%s" batch_size: 8 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 16 weight_filler { type: "xavier" } } }
layer { name: "relu" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop" type: "Dropout" bottom: "ip1" top: "drop"
  dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "drop" top: "ip2"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "side" type: "InnerProduct" bottom: "ip1" top: "side"
  inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }
layer { name: "sum" type: "Eltwise" bottom: "ip2" bottom: "side" top: "sum" }
layer { name: "accuracy" type: "Accuracy" bottom: "sum" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "sum" bottom: "label" top: "loss" }
"""


def _run_branchy(tiny, tmp_path, monkeypatch, layer_by_layer: bool):
    """A solver over a net with a blob read twice, an in-place layer and Dropout, iter_size 2;
    ``layer_by_layer``: every pass through the blobs (no pass run as one graph)."""
    from caffe_alex.solvers import engines

    net = tmp_path / "branchy.prototxt"
    net.write_text(BRANCHY_NET % (tiny["prefix"].parent / "list.txt"))
    text = tiny["solver"].read_text().replace(str(tiny["net"]), str(net))
    solver_path = tmp_path / "branchy_solver.prototxt"
    solver_path.write_text(text + "iter_size: 2\n")
    graph_passes = []
    original = engines.GraphEngine.forward
    monkeypatch.setattr(engines.GraphEngine, "forward",
                        lambda self, *a, **k: graph_passes.append(1) or original(self, *a, **k))
    if layer_by_layer:
        monkeypatch.setattr(engines.BlobEngine, "_unwatched", lambda self: False)
    solver = caffe.SGDSolver(str(solver_path))
    solver.step(5)
    trained = {name: [b.data.copy() for b in blobs] for name, blobs in solver.net.params.items()}
    train_blobs = {name: (b.data.copy(), b.diff.copy()) for name, b in solver.net.blobs.items()}
    scores = solver._solver.test(0)
    test_blobs = {name: b.data.copy() for name, b in solver.test_nets[0].blobs.items()}
    monkeypatch.undo()
    return trained, train_blobs, scores, test_blobs, len(graph_passes)


def test_step_runs_passes_python_cannot_see_as_one_graph_with_the_same_numbers(
    tiny, tmp_path, monkeypatch
):
    fast = _run_branchy(tiny, tmp_path, monkeypatch, layer_by_layer=False)
    exact = _run_branchy(tiny, tmp_path, monkeypatch, layer_by_layer=True)
    # as one graph: 4 iterations of 2 passes, the last iteration's first pass, and the first
    # of the 2 batches of each test pass (at iterations 0 and 3, and the one asked after);
    # through the blobs: the last pass of step and the last batch of each test
    assert fast[4] == 4 * 2 + 1 + 3 and exact[4] == 0
    for name, blobs in exact[0].items():  # the weights, bit for bit
        for a, b in zip(fast[0][name], blobs):
            np.testing.assert_array_equal(a, b)
    for name, (data, diff) in exact[1].items():  # what Python reads after step
        np.testing.assert_array_equal(fast[1][name][0], data, err_msg=name)
        np.testing.assert_array_equal(fast[1][name][1], diff, err_msg=name)
    assert fast[2] == exact[2]
    for name, data in exact[3].items():
        np.testing.assert_array_equal(fast[3][name], data, err_msg=name)
