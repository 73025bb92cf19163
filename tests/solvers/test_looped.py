"""The looped chunk (looped.py): a small net's iterations traced once by make_fx and run by one
compiled while_loop, with the numbers of the eager Solver for every captured layer type, the
same graph for every window length, and the nets it does not fit left to the unrolled chunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_alex.solvers.captured import CAPTURED_TYPES
from caffe_alex.solvers.looped import RANDOM_TYPES, why_not_looped

from .helpers import make_solver
from .test_captured import (
    MLP,
    CountingAotEager,
    _batches,
    _chunked,
    _params,
    _type_net,
    logreg_net,
)

FIXED = 'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"'


@pytest.mark.slow  # (a second each)
@pytest.mark.parametrize("kind", sorted(CAPTURED_TYPES - RANDOM_TYPES))
def test_each_captured_type_runs_in_the_loop_with_the_eager_numbers(kind):
    """Every layer type the captured step takes traces into the loop's body (make_fx: no
    value read on the host) and trains as the eager Solver does: 0-4 as one loop, 5 alone
    (a step's last runs eagerly), in one graph."""
    eager = make_solver(_type_net(kind), FIXED, _batches(6, features=6))
    graphs = CountingAotEager()
    looped = make_solver(_type_net(kind), FIXED, _batches(6, features=6), compile=graphs)
    step = _chunked(looped, 8)
    eager.step(6)
    looped.step(6)
    assert step.looped is not None and (step.chunks, step.calls, graphs.count) == (1, 0, 1)
    for ours, reference in zip(_params(looped), _params(eager)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_windows_of_every_length_share_the_loops_graph():
    """The count of rows a call runs is an input: windows of 1 to 4 iterations (cut short by
    a display every 6 and the ends of the steps) and the chunk's full 5 all run the one
    graph, none masked or recompiled."""
    text = 'base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" display: 6'
    single = make_solver(MLP, text, _batches(40), compile=CountingAotEager())
    _chunked(single, 0)
    graphs = CountingAotEager()
    looped = make_solver(MLP, text, _batches(40), compile=graphs)
    step = _chunked(looped, 5)
    for solver in (single, looped):
        for size in (3, 4, 9, 7, 13):
            solver.step(size)
    assert looped.iter == single.iter == 36 and graphs.count == 1
    assert sorted(step.looped._counts) == [1, 2, 3, 4, 5] and step.calls == 0
    for ours, reference in zip(_params(looped), _params(single)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)
    assert looped._progress.loss.value == pytest.approx(single._progress.loss.value, 1e-6)


def test_what_the_loop_does_not_fit_is_unrolled():
    dropout = make_solver(_type_net("Dropout"), FIXED, _batches(4, features=6),
                          compile=CountingAotEager())  # fmt: skip
    step = dropout._captured
    assert step.looped is None and step.chunk > 1  # unrolled: each draw its own
    assert why_not_looped(dropout.train_net, dropout.update) == (
        "its Dropout layers draw random numbers")
    solver = make_solver(MLP, FIXED, _batches(4), compile=CountingAotEager())
    assert why_not_looped(solver.train_net, solver.update) is None
    solver.train_net.register_buffer("counts", torch.zeros(3))  # state the loop would not carry
    assert why_not_looped(solver.train_net, solver.update) == (
        "it holds tensors outside the update")


@pytest.mark.subprocess  # inductor compiles the C++ in worker processes
def test_inductors_cache_keeps_each_loop_apart(tmp_path, monkeypatch):
    """The loop's graph goes through inductor's graph cache (captured.inductor_options): a
    second solver of the same net and rule hits it, and one whose momentum differs (the body
    graph holds it as a constant) is compiled anew and trains at its own momentum."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # (read at each lookup)
    counters.clear()
    trained = {}
    for name, momentum in (("first", 0.9), ("again", 0.9), ("other", 0.5)):
        text = f'base_lr: 0.1 momentum: {momentum} lr_policy: "fixed"'
        captured = make_solver(MLP, text, _batches(10), compile=True)
        eager = make_solver(MLP, text, _batches(10))
        assert captured._captured.looped is not None
        captured.step(10)
        eager.step(10)
        for ours, reference in zip(_params(captured), _params(eager)):
            np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
        trained[name] = dict(counters["inductor"])
    assert trained["first"].get("fxgraph_cache_miss") == 1
    assert trained["again"].get("fxgraph_cache_hit") == 1
    assert trained["other"].get("fxgraph_cache_miss") == 2


@pytest.mark.slow  # (three solvers, two snapshots: seconds)
def test_a_restored_solver_goes_on_in_the_loop_as_the_run_it_came_from(tmp_path):
    """Restoring a snapshot replaces the weights and the rule's history the compiled loop
    reads and writes: the resumed run (its loop compiled after the restore, and one compiled
    before it) ends where the unbroken run does, bit for bit (aot_eager runs both op by op)."""
    from .test_captured import _logreg_solver

    folders = [tmp_path / name for name in ("whole", "resumed", "early")]
    for folder in folders:
        folder.mkdir()
    whole = _logreg_solver(folders[0], CountingAotEager(), 5)
    whole.step(12)  # snapshots at 6 and 12
    resumed = _logreg_solver(folders[1], CountingAotEager(), 5)
    early = _logreg_solver(folders[2], CountingAotEager(), 5)
    early.step(4)  # its loop compiled and run before the restore
    for solver in (resumed, early):
        before = solver._captured.chunks
        solver.restore(str(folders[0] / "snap_iter_6.solverstate"))
        solver.step(6)
        assert solver.iter == 12 and solver._captured.looped is not None
        assert solver._captured.chunks > before
        for ours, reference in zip(_params(solver), _params(whole)):
            np.testing.assert_array_equal(ours, reference)
        for ours, reference in zip(solver.rule.history, whole.rule.history):
            np.testing.assert_array_equal(ours.numpy(), reference.numpy())


_SHARED = """
layer { name: "data" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 8 dim: 5 } shape { dim: 8 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h1"
        param { name: "w" } param { name: "b" decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "h1" top: "h2"
        param { name: "w" } param { name: "b" decay_mult: 0 }
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip3" type: "InnerProduct" bottom: "h2" top: "out"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label" top: "loss" }
"""


@pytest.mark.slow  # (seconds: solvers compiled through aot_eager)
def test_blobs_shared_by_name_train_in_the_loop_as_one():
    """Two layers sharing their blobs by name (Caffe's param { name }): the loop carries the
    one blob, both layers' gradients summed into it, as the eager Solver does."""
    text = 'base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"'
    eager = make_solver(_SHARED, text, _batches(12))
    looped = make_solver(_SHARED, text, _batches(12), compile=CountingAotEager())
    step = _chunked(looped, 8)
    eager.step(12)
    looped.step(12)
    assert step.looped is not None and step.chunks == 2 and len(looped.update.params) == 4
    for ours, reference in zip(_params(looped), _params(eager)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # (seconds: solvers compiled through aot_eager)
def test_batches_of_another_shape_get_a_loop_of_their_own():
    """A feed given by hand that changes its batch size between chunks: the loop traces the
    step again for the new shapes (not the unrolled fallback), and both train as single
    steps do."""
    small = [{"x": b["x"][:5], "label": b["label"][:5]} for b in _batches(12)]
    batches = _batches(12) + small
    text = 'base_lr: 0.05 momentum: 0.9 lr_policy: "fixed"'
    single = make_solver(MLP, text, list(batches), compile=CountingAotEager())
    _chunked(single, 0)
    looped = make_solver(MLP, text, list(batches), compile=CountingAotEager())
    step = _chunked(looped, 4)
    for solver in (single, looped):
        solver.step(12)
        solver.step(12)
    assert step.looped is not None and len(step.looped._bodies) == 2
    for ours, reference in zip(_params(looped), _params(single)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)


def test_an_unrolled_chunk_after_a_loop_that_failed_traces_into_one_graph(monkeypatch):
    """The loop runs, then fails (a backend refusing a recompile, say): the chunks go on
    unrolled, whose first call still traces autograd.grad into its graph (one graph, no
    break), and the numbers stay those of single steps."""
    from torch._dynamo.exc import BackendCompilerFailed

    text = 'base_lr: 0.05 momentum: 0.9 lr_policy: "fixed"'
    single = make_solver(MLP, text, _batches(20), compile=CountingAotEager())
    _chunked(single, 0)
    single.step(20)
    graphs = CountingAotEager()
    solver = make_solver(MLP, text, _batches(20), compile=graphs)
    step = _chunked(solver, 4)
    solver.step(5)  # 0-3 in the loop, 4 eagerly
    assert (step.chunks, graphs.count) == (1, 1)

    def refused(*args):
        raise BackendCompilerFailed(lambda gm, inputs: None, RuntimeError("refused"))

    monkeypatch.setattr(step.looped, "compiled", refused)
    solver.step(15)  # 5-8 refused: one step each; 9-12, 13-16 unrolled, 17-18 too; 19 eager
    assert step.looped is None and step.unrolled == 3
    assert graphs.count == 3  # the loop, the single step, the unrolled chunk: no break
    for ours, reference in zip(_params(solver), _params(single)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)


@pytest.mark.slow  # (seconds: solvers compiled through aot_eager)
def test_a_chunk_is_no_longer_than_the_feed_reads_ahead(tmp_path):
    """Batches of 20 KiB: the HDF5 feed reads 50 of them ahead (1 MiB), so the loop runs
    chunks of 50, each taken as views of the read-ahead (none drawn one by one and copied),
    and trains as single steps do."""
    import h5py

    from caffe_alex.formats.prototxt import parse_solver_text
    from caffe_alex.solvers import Solver

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "data.h5", "w") as h5:
        h5["data"] = rng.normal(size=(800, 160)).astype(np.float32)
        h5["label"] = rng.integers(0, 3, 800).astype(np.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'data.h5'}\n")
    net = f"""layer {{ name: "data" type: "HDF5Data" top: "data" top: "label"
      hdf5_data_param {{ source: "{tmp_path / 'list.txt'}" batch_size: 32 }} }}
    layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param {{ num_output: 3 weight_filler {{ type: "xavier" }} }} }}
    layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}"""
    text = f'net_param {{ {net} }} base_lr: 0.01 momentum: 0.9 lr_policy: "fixed" random_seed: 1'
    runs = []
    for chunk in (0, 64):
        solver = Solver(parse_solver_text(text), compile=CountingAotEager())
        _chunked(solver, chunk)
        feed = solver.feeds["train"]
        drawn = []
        real_next = type(feed).__next__
        type(feed).__next__ = lambda self, real=real_next, drawn=drawn: (drawn.append(1),
                                                                         real(self))[1]
        try:
            solver.step(120)
        finally:
            type(feed).__next__ = real_next
        runs.append((solver, len(drawn)))
    (single, _), (looped, drawn) = runs
    assert looped.feeds["train"].takes_at_most() == 50 and looped._captured.chunk == 50
    assert looped._captured.chunks == 3 and drawn == 1  # 0-49, 50-99, 100-118; 119 eager
    for ours, reference in zip(_params(looped), _params(single)):
        np.testing.assert_allclose(ours, reference, rtol=1e-6, atol=1e-7)


def _tested_solver(folder, backend, test_iter: int = 9):
    """The HDF5 logreg of test_captured with a test pass of ``test_iter`` batches every 7."""
    from caffe_alex.formats.prototxt import parse_solver_text
    from caffe_alex.solvers import Solver

    text = (f"net_param {{ {logreg_net(folder)} }}\n"
            f'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed" test_interval: 7 '
            f"test_iter: {test_iter} random_seed: 3")  # fmt: skip
    return Solver(parse_solver_text(text), compile=backend)


def test_a_small_test_nets_pass_runs_as_loops_with_the_eager_scores(tmp_path):
    """A captured solver's test pass: all but the last batch as compiled loops (the running
    sums and loss carried in float32, in order), the last eagerly, its blobs left to read; the
    means, the test feed's position and the blobs are the eager pass's."""
    runs = []
    for name, backend in (("eager", None), ("looped", CountingAotEager())):
        (tmp_path / name).mkdir()
        solver = _tested_solver(tmp_path / name, backend)
        solver.step(8)  # tests at 0 and 7
        means = solver._tests.run(0, solver.iter, solver.ranks, solver.snapshot)
        runs.append((solver, means))
    (eager, eager_means), (looped, looped_means) = runs
    assert 0 in looped._tests.looped and not eager._tests.looped
    assert len(looped._tests.looped[0]._bodies) == 1  # (8 of each pass's 9 batches in a loop)
    assert looped_means.keys() == eager_means.keys() == {"accuracy", "loss"}
    assert looped_means["accuracy"] == eager_means["accuracy"]
    assert looped_means["loss"] == pytest.approx(eager_means["loss"], rel=1e-6)
    assert looped.feeds[0].batches == eager.feeds[0].batches == 27
    for blob in ("data", "ip", "accuracy"):
        torch.testing.assert_close(looped.test_nets[0].blobs[blob], eager.test_nets[0].blobs[blob])


def test_a_stop_asked_during_a_looped_test_pass_interrupts_it(tmp_path):
    solver = _tested_solver(tmp_path, CountingAotEager(), test_iter=30)
    solver.step(1)
    solver.request("stop")  # seen before the pass's first loop
    assert solver._tests.run(0, solver.iter, solver.ranks, solver.snapshot) == {}


def test_a_test_net_that_draws_random_numbers_is_scored_eagerly():
    from caffe_alex.solvers.looped import why_not_looped_test

    solver = make_solver(_type_net("Dropout"), FIXED, _batches(4, features=6),
                         compile=CountingAotEager())  # fmt: skip
    assert why_not_looped_test(solver.train_net) == "its Dropout layers draw random numbers"
    assert why_not_looped_test(make_solver(MLP, FIXED, _batches(4)).train_net) is None


def test_a_looped_test_pass_that_fails_goes_on_eagerly_with_its_batches(tmp_path, monkeypatch):
    """make_fx refuses the test net's forward: the pass scores the batches it took and the
    rest eagerly (the eager pass's means), warns, and the next passes are eager."""
    from caffe_alex.solvers.looped import LoopedScores

    (tmp_path / "eager").mkdir()
    (tmp_path / "failing").mkdir()
    eager = _tested_solver(tmp_path / "eager", None)

    def refused(self, stacked):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(LoopedScores, "_trace", refused)
    failing = _tested_solver(tmp_path / "failing", CountingAotEager())
    assert 0 in failing._tests.looped
    means = {}
    for name, solver in (("eager", eager), ("failing", failing)):
        solver.step(1)
        means[name] = solver._tests.run(0, solver.iter, solver.ranks, solver.snapshot)
    assert not failing._tests.looped
    assert means["failing"]["accuracy"] == means["eager"]["accuracy"]
    assert means["failing"]["loss"] == pytest.approx(means["eager"]["loss"], rel=1e-6)
    assert failing.feeds[0].batches == eager.feeds[0].batches == 18


def test_a_test_net_with_other_layer_types_is_scored_eagerly():
    from caffe_alex.solvers.captured import CAPTURED_TYPES
    from caffe_alex.solvers.looped import looped_tests

    solver = make_solver(MLP, FIXED, _batches(4), compile=CountingAotEager())
    assert list(looped_tests([solver.train_net], lambda f: f, CAPTURED_TYPES)) == [0]
    assert looped_tests([solver.train_net], lambda f: f, CAPTURED_TYPES - {"TanH"}) == {}
