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
from .test_captured import MLP, CountingAotEager, _batches, _chunked, _params, _type_net

FIXED = 'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01 lr_policy: "fixed"'


@pytest.mark.slow  # (a second each)
@pytest.mark.parametrize("kind", sorted(CAPTURED_TYPES - RANDOM_TYPES))
def test_each_captured_type_runs_in_the_loop_with_the_eager_numbers(kind):
    """Every layer type the captured step takes traces into the loop's body (make_fx: no
    value read on the host) and trains as the eager Solver does: 1-4 as one loop, 5 alone
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
        solver.restore(str(folders[0] / "snap_iter_6.solverstate"))
        solver.step(6)
        assert solver.iter == 12 and solver._captured.looped is not None
        assert solver._captured.chunks >= 1
        for ours, reference in zip(_params(solver), _params(whole)):
            np.testing.assert_array_equal(ours, reference)
        for ours, reference in zip(solver.rule.history, whole.rule.history):
            np.testing.assert_array_equal(ours.numpy(), reference.numpy())
