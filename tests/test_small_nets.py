"""What a small net costs per iteration, counted rather than timed, so a regression fails here
on any machine: the aten ops dispatched, the autograd nodes built and the thread count of a
training iteration of BVLC's brewing-logreg net (HDF5Data, InnerProduct, Accuracy,
SoftmaxWithLoss, Caffe's SGD); the update's ops do not grow with the number of blobs; a batch
read at once is the batch read row by row.

The bounds come from the net's structure (see each test); benchmarks/small_nets.py has the
timings.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from caffe_alex.data.loader import make_feed
from caffe_alex.data.sources import DataError
from caffe_alex.formats.prototxt import parse_solver_text
from caffe_alex.net import ONE_THREAD_ELEMENTS, Net
from caffe_alex.solvers import Solver
from tests.reference import parse_net

SOLVER = """base_lr: 0.01 lr_policy: "step" gamma: 0.1 stepsize: 5000 momentum: 0.9
weight_decay: 5e-4 display: 0 max_iter: 100 solver_mode: CPU random_seed: 1"""


def logreg_text(listing) -> str:
    return f"""
layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
  hdf5_data_param {{ source: "{listing}" batch_size: 10 }} }}
layer {{ name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param {{ num_output: 2 weight_filler {{ type: "xavier" }} }} }}
layer {{ name: "accuracy" type: "Accuracy" bottom: "ip1" bottom: "label" top: "accuracy" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }}
"""


def write_h5(path, data, label) -> str:
    import h5py

    with h5py.File(path, "w") as h5:
        h5["data"], h5["label"] = data, label
    return str(path)


def logreg_solver(folder) -> Solver:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    listing = folder / "train.txt"
    listing.write_text(write_h5(folder / "train.h5", x, y) + "\n")
    text = f"net_param {{ {logreg_text(listing)} }}\n{SOLVER}"
    solver = Solver(parse_solver_text(text))
    solver.step(2)  # the first iterations make the history, feed and caches
    return solver


@pytest.fixture
def logreg(tmp_path):
    solver = logreg_solver(tmp_path)
    yield solver
    solver.close()


class Ops(TorchDispatchMode):
    """Counts the aten ops dispatched (in forward, the autograd engine's backward, update)."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def graph_nodes(tensor) -> list[str]:
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(type(n).__name__ for n in seen)


def test_logreg_iteration_builds_one_autograd_node_per_op(logreg):
    net = logreg.train_net
    net(**next(logreg.feeds["train"]))
    nodes = graph_nodes(net.loss)
    # InnerProduct: its addmm and the weight's transpose; SoftmaxWithLoss: log_softmax and
    # nll_loss (its mean is the normaliser's division; no clamp: no loss near -log(FLT_MIN));
    # one AccumulateGrad per learnable blob; nothing for Accuracy (no gradient), for a reshape
    # that changes nothing, nor for the net's loss sum (one loss, weight 1). The ops spelled
    # out took 17 nodes.
    blobs = len(net.learnable_params())
    assert len(nodes) <= 2 + 2 + blobs, nodes
    assert nodes.count("NllLossBackward0") == 1 and "DivBackward0" not in nodes


def test_logreg_iteration_dispatches_a_bounded_number_of_ops(logreg):
    with Ops() as counted:
        logreg.step(1)
    # A budget per part of the net: the feed none (its tensors are made from the arrays it
    # reads, DataFeed._direct_batch; through the batch buffer it copied 2 per top);
    # InnerProduct 4 ops forward and 4 backward, SoftmaxWithLoss 4 and 3 (log_softmax,
    # nll_loss's mean, reading it, and their backward), Accuracy 3 (its scores read out and counted
    # in Python: no gather, compare or count ops); the update a fixed number of foreach
    # calls, 8 (see below); the loss kept for the display 2; autograd's seed and detaches 6.
    # Today's count is 30; before the overhead work it was 115, then 47 with Accuracy's seven
    # tensor ops and the loss clamp's three, 34 with the feed's buffer, 32 with a division
    # after nll_loss's sum.
    bound = (4 + 4) + (4 + 3) + 3 + 8 + 2 + 6
    assert counted.total <= bound, counted.ops.most_common()
    assert counted.ops["aten.gather.default"] == 0  # Accuracy counted in Python
    assert counted.ops["aten.clamp.default"] == 0  # no loss reaches -log(FLT_MIN) here
    assert counted.ops["aten._log_softmax.default"] == 1
    assert counted.ops["aten.nll_loss_forward.default"] == 1


def test_iterations_no_one_reads_skip_the_train_nets_accuracy(logreg, tmp_path, monkeypatch):
    # Accuracy is pure and no loss needs it: it runs where its output is shown (a display)
    # or left to read (the last iteration of a step), and the training is the same
    from caffe_alex.layers.accuracy import AccuracyLayer

    monkeypatch.setattr(AccuracyLayer, "pure", False)
    (tmp_path / "twin").mkdir()
    twin = logreg_solver(tmp_path / "twin")  # the same, with an Accuracy that runs each time
    monkeypatch.undo()
    logreg.param.display = twin.param.display = 2
    ran = {id(logreg): [], id(twin): []}
    for solver in (logreg, twin):
        solver.train_net.layer("accuracy").register_forward_hook(
            lambda *a, solver=solver: ran[id(solver)].append(solver.iter))  # fmt: skip
        solver.step(5)  # iterations 2-6: displays at 2, 4 and 6, 6 the last
    assert ran[id(logreg)] == [2, 4, 6] and ran[id(twin)] == [2, 3, 4, 5, 6]
    assert logreg.train_net.blobs["accuracy"].dim() == 0  # the last iteration's, to read
    for ours, reference in zip(logreg.learnable, twin.learnable):
        assert torch.equal(ours.param, reference.param)
    twin.close()


def test_callbacks_and_debug_info_read_every_layer_unless_they_say_otherwise(logreg):
    # a callback may read the train net's blobs after any iteration: Accuracy runs for it,
    # unless it says it reads none (the CLI's progress bar); debug_info logs every layer of
    # every pass, iter_size's earlier passes too
    import logging

    from caffe_alex.log import get_logger

    seen = []
    logreg.callbacks.append(lambda *a: seen.append(float(logreg.train_net.blobs["accuracy"])))
    logreg.step(4)
    assert len(seen) == 4
    quiet = lambda *a: None  # noqa: E731
    quiet.reads_blobs = False
    logreg.callbacks[:] = [quiet]
    ran = []
    logreg.train_net.layer("accuracy").register_forward_hook(lambda *a: ran.append(logreg.iter))
    logreg.step(3)
    assert ran == [8]  # the last only
    logreg.param.display, logreg.param.debug_info, logreg.param.iter_size = 1, True, 2
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    log = get_logger()
    level = log.level
    log.setLevel("INFO")
    log.addHandler(handler)
    try:
        logreg.step(2)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert sum("[Forward] Layer accuracy, top blob" in line for line in lines) == 4


def test_a_loss_only_pass_keeps_layers_that_draw_or_feed_a_loss():
    net = Net(parse_net("""
    layer { name: "x" type: "Input" top: "x" top: "label"
            input_param { shape { dim: 4 dim: 3 } shape { dim: 4 } } }
    layer { name: "ip" type: "InnerProduct" bottom: "x" top: "ip"
            inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "drop" type: "Dropout" bottom: "ip" top: "drop" }
    layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" }
    layer { name: "acc_drop" type: "Accuracy" bottom: "drop" bottom: "label" top: "acc2" }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    layer { name: "sm" type: "Softmax" bottom: "ip" top: "sm" }
    layer { name: "l2" type: "EuclideanLoss" bottom: "sm" bottom: "ip" top: "l2" }
    """), "TRAIN")  # fmt: skip
    batch = {"x": torch.randn(4, 3), "label": torch.tensor([0.0, 1, 2, 0])}
    full = net(**batch)
    with net.loss_only():
        outputs = net(**batch)
    # Dropout draws from the RNG (skipping it would change later draws): it runs; a Softmax
    # that a loss reads runs; the two Accuracy layers and the "prob" Softmax do not, and
    # their tops are missing
    assert set(net.blobs) == {"x", "label", "ip", "drop", "loss", "sm", "l2"}
    assert set(outputs) == {"loss", "l2"}
    assert set(full) == {"acc", "acc2", "loss", "prob", "l2"}
    for name in outputs:
        assert torch.equal(outputs[name], full[name])
    net(**batch)  # outside the block every layer runs again
    assert "acc" in net.blobs


def deep_net(layers: int) -> str:
    text = 'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 4 dim: 3 } } }\n'
    bottom = "x"
    for i in range(layers):
        text += (
            f'layer {{ name: "ip{i}" type: "InnerProduct" bottom: "{bottom}" top: "ip{i}" '
            "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 } "
            'inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }\n'
        )
        bottom = f"ip{i}"
    loss = f'layer {{ name: "loss" type: "Reduction" bottom: "{bottom}" top: "loss" '
    return text + loss + "loss_weight: 1 }\n"


@pytest.mark.parametrize("kind", ["SGD", "Nesterov"])
def test_update_ops_do_not_grow_with_the_blobs(kind):
    counts = []
    for layers in (1, 10):
        text = f'net_param {{ {deep_net(layers)} }}\ntype: "{kind}"\n{SOLVER}'
        data = {"x": torch.ones(4, 3)}
        solver = Solver(parse_solver_text(text), feeds={"train": iter([data] * 4), "test": []})
        solver.step(1)
        solver.train_net(**data).get("loss")
        solver.train_net.loss.backward()
        with Ops() as counted:
            solver.apply_update()
        counts.append(counted.total)
    assert counts[0] == counts[1], counts  # 2 or 20 blobs: the same foreach calls


def test_a_small_net_trains_on_one_thread_and_a_large_one_keeps_the_pool(logreg, monkeypatch):
    threads, seen = [2], []  # as on a 2-core machine, whatever this one has

    def set_threads(n):
        threads[0] = n
        seen.append(n)

    monkeypatch.setattr(torch, "get_num_threads", lambda: threads[0])
    monkeypatch.setattr(torch, "set_num_threads", set_threads)
    logreg.step(1)
    assert seen == [1, 2]  # one thread for the iteration, the pool back after it
    net = Net(parse_net(deep_net(1).replace("dim: 4 dim: 3", "dim: 4 dim: 40000")))
    assert 4 * 40000 >= ONE_THREAD_ELEMENTS and not net.one_thread()
    seen.clear()
    net(x=torch.ones(4, 40000))
    assert seen == []
    net.thread_policy = "one"
    net(x=torch.ones(4, 40000))
    assert seen == [1, 2]


def hdf5_order(seed: int, sizes: list[int], shuffle: bool, position: int) -> tuple[int, int]:
    """(file, row) of a stream position, as HDF5Data's reader has always placed it (written
    out here as the one-position loop it was): each epoch the files in a seeded order, and
    within a file its rows in a seeded order, with shuffle."""
    epoch, offset = divmod(position, sum(sizes))
    order = list(range(len(sizes)))
    if shuffle:
        order = list(np.random.default_rng((seed, 3, epoch)).permutation(order))
    for file in order:
        if offset < sizes[file]:
            row = offset
            if shuffle:
                rows = np.random.default_rng((seed, 4, epoch, file)).permutation(sizes[file])
                row = int(rows[row])
            return file, row
        offset -= sizes[file]
    raise AssertionError("unreachable")


def two_hdf5_files(tmp_path) -> list[np.ndarray]:
    """Two .h5 files of 4 and 5 rows (label = the first feature) listed in list.txt."""
    parts = [np.arange(8, dtype=np.float32).reshape(4, 2), 100 + np.arange(10, dtype=np.float32)
             .reshape(5, 2)]  # fmt: skip
    files = [write_h5(tmp_path / f"{i}.h5", a, a[:, 0]) for i, a in enumerate(parts)]
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    return parts


def hdf5_net(tmp_path, batch: int, shuffle: bool) -> Net:
    flag = "shuffle: true" if shuffle else ""
    text = f"""layer {{ name: "h" type: "HDF5Data" top: "data" top: "label"
      hdf5_data_param {{ source: "{tmp_path / "list.txt"}" batch_size: {batch} {flag} }} }}"""
    return Net(parse_net(text), "TRAIN")


def test_a_batch_read_at_once_holds_the_rows_in_the_readers_order(tmp_path):
    parts = two_hdf5_files(tmp_path)
    for shuffle in (False, True):
        net = hdf5_net(tmp_path, 4, shuffle)
        feed = make_feed(net, seed=3, workers=0)
        seed = feed.layers[0].source.seed
        for b in range(6):  # batches that straddle the files and the epochs
            batch = next(feed)
            want = [parts[f][r] for f, r in (hdf5_order(seed, [4, 5], shuffle, p)
                                             for p in range(4 * b, 4 * b + 4))]  # fmt: skip
            np.testing.assert_array_equal(batch["data"].numpy(), want)
            np.testing.assert_array_equal(batch["label"].numpy(), [w[0] for w in want])


def test_arrays_skip_the_batch_buffer_and_give_the_same_batches(tmp_path):
    # HDF5Data on the CPU without workers goes from the loaded arrays straight to the batch
    # (DataFeed._direct_batch); the buffer's path must give the same batches, and a batch
    # changed in place must not change the arrays the next epoch reads.
    parts = two_hdf5_files(tmp_path)
    for shuffle in (False, True):
        net = hdf5_net(tmp_path, 3, shuffle)
        direct, buffered = make_feed(net, seed=5, workers=0), make_feed(net, seed=5, workers=0)
        assert direct._direct
        buffered._direct = False
        for _ in range(7):  # more than two epochs of 9 rows
            a, b = next(direct), next(buffered)
            assert a.keys() == b.keys()
            for top in a:
                assert a[top].dtype == torch.float32 and a[top].shape == b[top].shape
                assert torch.equal(a[top], b[top]), top
                a[top].fill_(-1)  # the caller's to change
        source = direct.layers[0].source
        assert not any((a == -1).any() for f in range(len(parts)) for a in source._load(f))


def test_small_batches_are_read_ahead_as_one_at_a_time(tmp_path):
    # Small HDF5 batches are read many at a time and handed out as slices of those arrays:
    # the same batches as reading each alone, whatever the rank, and a batch changed in place
    # leaves the batches after it (slices of the same arrays) alone.
    two_hdf5_files(tmp_path)
    for shuffle, rank, world in ((False, 0, 1), (True, 0, 1), (True, 1, 2)):
        net = hdf5_net(tmp_path, 2, shuffle)
        ahead = make_feed(net, seed=5, workers=0, rank=rank, world_size=world)
        alone = make_feed(net, seed=5, workers=0, rank=rank, world_size=world)
        assert ahead._ahead_count == 64
        alone._ahead_count = 1
        for _ in range(11):  # past two epochs of 9 rows, shared by the ranks
            a, b = next(ahead), next(alone)
            for top in b:
                assert torch.equal(a[top], b[top]), (shuffle, rank, top)
                a[top].fill_(-1)


def test_a_feed_moved_back_reads_its_batches_again(tmp_path):
    # load_state moves the feed back over batches it read ahead: they are read again from the
    # files, so batches their caller changed in place come back as the files hold them
    two_hdf5_files(tmp_path)
    feed = make_feed(hdf5_net(tmp_path, 2, True), seed=5, workers=0)
    next(feed)
    state = feed.state()
    seen = []
    for _ in range(3):
        batch = next(feed)
        seen.append({top: t.clone() for top, t in batch.items()})
        batch["data"].fill_(-1)
    feed.load_state(state)
    for want in seen:
        got = next(feed)
        for top in want:
            assert torch.equal(got[top], want[top]), top


def test_read_ahead_stops_before_rows_of_another_shape(tmp_path):
    # The first file's rows have 2 features, the second's 3: the batches of the first file
    # still come straight from its arrays, and the one reaching into the second file names
    # the row that differs, as it does when read alone.
    files = [write_h5(tmp_path / "a.h5", np.arange(8.0).reshape(4, 2), np.zeros(4)),
             write_h5(tmp_path / "b.h5", np.ones((4, 3)), np.zeros(4))]  # fmt: skip
    (tmp_path / "list.txt").write_text("\n".join(files) + "\n")
    feed = make_feed(hdf5_net(tmp_path, 2, False), seed=0, workers=0)
    assert feed._ahead_count > 2
    np.testing.assert_array_equal(next(feed)["data"].numpy(), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(next(feed)["data"].numpy(), [[4, 5], [6, 7]])
    with pytest.raises(DataError, match=r"row 0 of '.*b\.h5'.*shape \(3,\)"):
        next(feed)


def test_read_ahead_fits_a_budget_and_skips_arrays_that_may_change(tmp_path):
    write_h5(tmp_path / "big.h5", np.zeros((8, 3, 100, 100), np.float32), np.zeros(8))
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'big.h5'}\n")
    assert make_feed(hdf5_net(tmp_path, 4, False), workers=0)._ahead_count == 2  # 480 KB each
    net = Net(parse_net("""layer { name: "m" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 1 channels: 1 height: 1 width: 1 } }"""), "TRAIN")
    # MemoryData: set_input_arrays may give other arrays before any batch, read from row 0
    net.set_input_arrays(np.zeros((4, 1, 1, 1)), np.zeros(4))
    feed = make_feed(net, seed=0, workers=0)
    assert feed._ahead_count == 1
    assert next(feed)["data"].item() == 0
    net.set_input_arrays(np.arange(1.0, 5.0).reshape(4, 1, 1, 1), np.zeros(4))
    assert [next(feed)["data"].item() for _ in range(2)] == [1, 2]


def test_memory_data_arrays_arrive_as_float32_copies():
    net = Net(
        parse_net("""layer { name: "m" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 2 channels: 1 height: 1 width: 3 } }"""),
        "TRAIN",
    )
    data = np.arange(12, dtype=np.float64).reshape(4, 1, 1, 3) / 3
    labels = np.arange(4, dtype=np.float64)
    net.set_input_arrays(data, labels)
    feed = make_feed(net, seed=0, workers=0)
    assert feed._direct
    first, second = next(feed), next(feed)
    assert first["data"].dtype == torch.float32
    np.testing.assert_array_equal(first["data"].numpy(), data[:2].astype(np.float32))
    np.testing.assert_array_equal(second["label"].numpy(), [2, 3])
    first["data"].fill_(7)
    assert not (data == 7).any()


@pytest.mark.subprocess
def test_openmp_threads_spin_briefly_unless_the_user_chose():
    import os
    import subprocess
    import sys

    code = ("import os, caffe_alex, torch; e = os.environ; "
            "print(e.get('GOMP_SPINCOUNT'), e.get('OMP_WAIT_POLICY'))")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    for given, want in (({}, "10000 None"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None ACTIVE"),
                        ({"GOMP_SPINCOUNT": "5"}, "5 None")):  # fmt: skip
        done = subprocess.run([sys.executable, "-c", code], env={**env, **given},
                              capture_output=True, text=True, check=True)  # fmt: skip
        assert done.stdout.strip() == want
