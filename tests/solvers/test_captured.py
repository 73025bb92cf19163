"""The captured training step (captured.py): the Solver's ``compile`` option on a small net of
capturable layers runs forward, backward and update as one compiled function; the numbers stay
those of the eager Solver within float32 rounding, the iterations Python reads (display, the
last of a step) run eagerly, and nets or settings it does not fit are left to the per-net
compile, with the reason logged."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from caffe_alex.solvers.captured import CAPTURED_TYPES, why_not_captured

from .helpers import make_solver
from .test_speed_options import NET as CONV_NET
from .test_speed_options import SOLVER as CONV_SOLVER
from .test_speed_options import _batches as conv_batches

MLP = """
layer { name: "data" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 8 dim: 5 } shape { dim: 8 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h1"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 }
                              bias_filler { type: "uniform" min: -0.5 max: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "h1" top: "h1" }
layer { name: "ip2" type: "InnerProduct" bottom: "x" top: "h2"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "tanh2" type: "TanH" bottom: "h2" top: "t2" }
layer { name: "sum" type: "Eltwise" bottom: "h1" bottom: "t2" top: "s" }
layer { name: "cat" type: "Concat" bottom: "s" bottom: "h1" top: "c" }
layer { name: "ip3" type: "InnerProduct" bottom: "c" top: "out"
        param { lr_mult: 0 } param { lr_mult: 1 }
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "out" bottom: "label" top: "accuracy" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label" top: "loss" }
"""
# Nesterov, L1, a rate that changes every iteration (inv), a display every 5
SOLVER = """type: "Nesterov" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01
regularization_type: "L1" lr_policy: "inv" gamma: 0.1 power: 0.75 display: 5 max_iter: 24"""


def _batches(count=24, features=5):
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(8, features, generator=gen),
             "label": torch.randint(0, 3, (8,), generator=gen).float()}
            for _ in range(count)]  # fmt: skip


def _params(solver) -> list[np.ndarray]:
    return [info.param.detach().numpy().copy() for info in solver.learnable]


# a small net's chunks run as one compiled loop (looped.py); a net that draws random numbers
# has them unrolled into one graph (captured.py ``_steps``, rows past a window masked)
PATHS = ("loop", "unrolled")


def _chunked(solver, chunk: int, path: str = "loop"):
    """``solver``'s captured step in chunks of up to ``chunk`` (0: single steps), run as
    ``path``."""
    step = solver._captured
    step.chunk = chunk
    if path == "unrolled":
        step.looped = None
    assert (step.looped is not None) == (path == "loop" and chunk > 1) or not chunk
    return step


@pytest.mark.subprocess  # inductor compiles the C++ in worker processes
def test_captured_step_compiles_once_and_gives_the_eager_numbers():
    # the compile option as users give it: inductor, with the options the captured step
    # asks of it (its C++ wrapper)
    from torch._dynamo.utils import counters

    eager = make_solver(MLP, SOLVER, _batches())
    graphs_before = counters["stats"]["unique_graphs"]
    captured = make_solver(MLP, SOLVER, _batches(), compile=True)
    assert captured._captured is not None and eager._captured is None
    frozen = _params(captured)[4]  # ip3's weight: lr_mult 0
    captured._captured.chunk = 3
    eager.step(24)
    captured.step(24)
    # displays at 0, 5, 10, 15, 20 and the last iteration run eagerly; the others as chunks
    # of up to 3 that end before a display (1-3 and 4, 6-8 and 9, ..., 21-22; a chunk cut
    # short has its last rows masked): one graph for all of them, although the rate changed
    # every iteration, and no single step
    step = captured._captured
    assert (step.calls, step.chunks) == (0, 9)
    assert counters["stats"]["unique_graphs"] - graphs_before == 1
    assert captured.iter == eager.iter == 24
    for ours, reference in zip(_params(captured), _params(eager)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(_params(captured)[4], frozen)
    for history, reference in zip(captured.rule.history, eager.rule.history):
        np.testing.assert_allclose(history.numpy(), reference.numpy(), rtol=1e-5, atol=1e-7)
    assert captured._progress.loss.value == pytest.approx(eager._progress.loss.value, 1e-5)
    # the last iteration ran eagerly: its blobs are there to read
    assert set(captured.train_net.blobs) >= {"h1", "out", "loss"}


@pytest.mark.subprocess  # inductor compiles the C++ in worker processes
def test_a_dropout_net_is_captured_by_inductors_cpp_wrapper():
    """Dropout's random draws inside the C++ wrapper inductor generates for the captured step:
    the chunk compiles (no fallback to single steps or the eager path) and trains."""
    solver = make_solver(_type_net("Dropout"), 'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed"',
                         _batches(20, features=6), compile=True)  # fmt: skip
    first = _params(solver)
    solver.step(19)
    step = solver._captured
    assert step is not None and step.chunk > 1 and step.chunks >= 2 and step.calls == 0
    assert solver.iter == 19 and np.isfinite(solver._progress.loss.value)
    for after, before in zip(_params(solver), first):
        assert np.isfinite(after).all() and not np.array_equal(after, before)


@pytest.mark.parametrize("rule", [
    'type: "SGD" momentum: 0.9',
    'type: "AdaGrad" delta: 1e-6',
    'type: "RMSProp" rms_decay: 0.95 delta: 1e-6',
    'type: "Adam" momentum: 0.9 momentum2: 0.99 delta: 1e-7',
])  # fmt: skip
@pytest.mark.parametrize("path", PATHS)
def test_each_captured_rule_compiles_to_the_eager_rules_numbers(rule, path):
    # aot_eager runs the traced graph (forward, autograd.grad, the update) op by op: the
    # captured update's formulas against the eager rules (inductor's own kernels are the
    # Nesterov test's above); Adam's bias correction changes every iteration
    text = f'{rule} base_lr: 0.05 weight_decay: 0.01 lr_policy: "step" gamma: 0.5 stepsize: 5'
    eager = make_solver(MLP, text, _batches(12))
    graphs = CountingAotEager()
    captured = make_solver(MLP, text, _batches(12), compile=graphs)
    step = _chunked(captured, 3, path)
    eager.step(12)
    captured.step(12)
    # 0-2, 3-5 and 6-8 as chunks, 9-10 as one cut short (a loop of two; unrolled: its third
    # row masked), 11 eagerly (the last of the step): one graph, Adam's correction a row per
    # iteration in a chunk
    assert (step.calls, step.chunks, graphs.count) == (0, 4, 1)
    for ours, reference in zip(_params(captured), _params(eager)):
        np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=1e-6)
    for history, reference in zip(captured.rule.history, eager.rule.history):
        np.testing.assert_allclose(history.numpy(), reference.numpy(), rtol=2e-5, atol=1e-7)


class CountingAotEager:
    """aot_eager, counting the graphs it is given."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        self.count += 1
        return aot_autograd(fw_compiler=boxed_nop)(gm, example_inputs)


class RefusesGraph(CountingAotEager):
    """aot_eager that refuses the graph it is given ``n``-th (0: the first), as a backend
    without a working compiler would; the others it runs."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def __call__(self, gm, example_inputs):
        if self.count == self.n:
            self.count += 1
            raise RuntimeError(f"graph {self.n} refused")
        return super().__call__(gm, example_inputs)


def test_what_the_captured_step_does_not_fit_keeps_the_per_net_compile():
    def reason(net, solver, batches, **options):
        made = make_solver(net, solver, batches, compile="aot_eager", **options)
        assert made._captured is None
        return why_not_captured(made.param, made.train_net, made.device, made.precision,
                                made.ranks, layerwise=bool(options.get("layerwise")))  # fmt: skip

    assert "Convolution, Pooling layers" in reason(CONV_NET, CONV_SOLVER, conv_batches())
    assert "AdaDelta" in reason(MLP, 'type: "AdaDelta" base_lr: 0.1 lr_policy: "fixed" '
                                'momentum: 0.9', _batches())  # fmt: skip
    assert "iter_size" in reason(MLP, SOLVER + " iter_size: 2", _batches())
    assert "clip_gradients" in reason(MLP, SOLVER + " clip_gradients: 1", _batches())
    assert "layer by layer" in reason(MLP, SOLVER, _batches(), layerwise=True)
    assert "precision" in reason(MLP, SOLVER, _batches(), precision="bf16")
    frozen = MLP.replace(
        "param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }",
        "param { lr_mult: 0 } param { lr_mult: 0 }",
    )
    frozen = frozen.replace(
        'type: "InnerProduct" bottom: "x" top: "h2"',
        'type: "InnerProduct" bottom: "x" top: "h2" param { lr_mult: 0 } param { lr_mult: 0 }',
    )
    frozen = frozen.replace("param { lr_mult: 0 } param { lr_mult: 1 }",
                            "param { lr_mult: 0 } param { lr_mult: 0 }")  # fmt: skip
    assert "learns nothing" in reason(frozen, SOLVER, _batches())
    assert make_solver(MLP, SOLVER, _batches())._captured is None  # not asked
    # size does not decide: an MLP too large for one thread is captured too
    wide = MLP.replace("num_output: 6", "num_output: 5000")
    made = make_solver(wide, SOLVER, _batches(), compile="aot_eager")
    assert not made.train_net.one_thread() and made._captured is not None
    assert made._captured.chunk == 0  # its iterations are arithmetic: one call each


_HEAD = """layer { name: "data" type: "Input" top: "x" top: "label"
        input_param { shape { dim: 8 dim: 6 } shape { dim: 8 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "x" top: "h"
        inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.5 } } }
"""
_SCORES = """layer { name: "ip2" type: "InnerProduct" bottom: "m" top: "out"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
"""
_SOFTMAX_LOSS = """layer { name: "loss" type: "SoftmaxWithLoss" bottom: "out" bottom: "label"
        top: "loss" }"""
# one net per captured type: the type between ip1 ("h") and ip2 (reading "m"), or as the loss
_BETWEEN = {
    "ReLU": 'layer { name: "m" type: "ReLU" bottom: "h" top: "m" }',
    "Sigmoid": 'layer { name: "m" type: "Sigmoid" bottom: "h" top: "m" }',
    "TanH": 'layer { name: "m" type: "TanH" bottom: "h" top: "m" }',
    "AbsVal": 'layer { name: "m" type: "AbsVal" bottom: "h" top: "m" }',
    "Power": 'layer { name: "m" type: "Power" bottom: "h" top: "m" '
             "power_param { power: 2 scale: 0.5 shift: 1 } }",
    "Exp": 'layer { name: "m" type: "Exp" bottom: "h" top: "m" exp_param { scale: 0.1 } }',
    "Log": 'layer { name: "a" type: "AbsVal" bottom: "h" top: "a" } '
           'layer { name: "m" type: "Log" bottom: "a" top: "m" log_param { shift: 1 } }',
    "BNLL": 'layer { name: "m" type: "BNLL" bottom: "h" top: "m" }',
    "ELU": 'layer { name: "m" type: "ELU" bottom: "h" top: "m" }',
    "Dropout": 'layer { name: "m" type: "Dropout" bottom: "h" top: "m" '
               "dropout_param { dropout_ratio: 0.3 } }",
    "Eltwise": 'layer { name: "m" type: "Eltwise" bottom: "h" bottom: "h" top: "m" '
               "eltwise_param { operation: PROD } }",
    "Concat": 'layer { name: "m" type: "Concat" bottom: "h" bottom: "h" top: "m" }',
    "Slice": 'layer { name: "m" type: "Slice" bottom: "h" top: "m" top: "rest" '
             "slice_param { slice_point: 2 } }",
    "Silence": 'layer { name: "m" type: "Slice" bottom: "h" top: "m" top: "rest" } '
               'layer { name: "s" type: "Silence" bottom: "rest" }',
    "Split": 'layer { name: "m" type: "Split" bottom: "h" top: "m" top: "copy" }',
    "Flatten": 'layer { name: "m" type: "Flatten" bottom: "h" top: "m" }',
    "Reshape": 'layer { name: "m" type: "Reshape" bottom: "h" top: "m" '
               "reshape_param { shape { dim: 0 dim: 2 dim: 3 } } }",
    "Scale": 'layer { name: "m" type: "Scale" bottom: "h" top: "m" '
             "scale_param { bias_term: true } }",
    "Bias": 'layer { name: "m" type: "Bias" bottom: "h" top: "m" }',
    "Softmax": 'layer { name: "m" type: "Softmax" bottom: "h" top: "m" }',
}  # fmt: skip
_LOSSES = {
    "EuclideanLoss": 'layer { name: "t" type: "Reshape" bottom: "label" top: "t" '
                     "reshape_param { shape { dim: 8 dim: 1 } } } "
                     'layer { name: "target" type: "Concat" bottom: "t" bottom: "t" bottom: "t" '
                     'top: "target" } layer { name: "loss" type: "EuclideanLoss" '
                     'bottom: "out" bottom: "target" top: "loss" }',
    "SigmoidCrossEntropyLoss": 'layer { name: "t" type: "Power" bottom: "label" top: "t" '
                               "power_param { scale: 0.5 } } "
                               'layer { name: "one" type: "Slice" bottom: "out" top: "o" '
                               'top: "rest" slice_param { slice_point: 1 } } '
                               'layer { name: "r" type: "Reshape" bottom: "o" top: "r" '
                               "reshape_param { shape { dim: 8 } } } "
                               'layer { name: "s" type: "Silence" bottom: "rest" } '
                               'layer { name: "loss" type: "SigmoidCrossEntropyLoss" '
                               'bottom: "r" bottom: "t" top: "loss" }',
    "Accuracy": _SOFTMAX_LOSS + ' layer { name: "acc" type: "Accuracy" bottom: "out" '
                'bottom: "label" top: "acc" }',
    "SoftmaxWithLoss": _SOFTMAX_LOSS,
    "InnerProduct": _SOFTMAX_LOSS,
}  # fmt: skip


class _Graphs:
    """A backend that runs the traced graph as it is, counting the graphs (a graph break or a
    recompile adds one)."""

    def __init__(self):
        self.count = 0

    def __call__(self, gm, example_inputs):
        self.count += 1
        return gm.forward


def _type_net(kind: str) -> str:
    if kind in _LOSSES:
        relu = 'layer { name: "m" type: "ReLU" bottom: "h" top: "m" }\n'
        return _HEAD + relu + _SCORES + _LOSSES[kind]
    return _HEAD + _BETWEEN[kind] + "\n" + _SCORES + _SOFTMAX_LOSS


def test_every_captured_type_is_tried_below():
    assert CAPTURED_TYPES == set(_BETWEEN) | set(_LOSSES)


@pytest.mark.parametrize("kind", sorted(CAPTURED_TYPES))
def test_each_captured_type_compiles_into_one_graph(kind):
    graphs = _Graphs()
    solver = make_solver(_type_net(kind), 'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed"',
                         _batches(6, features=6), compile=graphs)  # fmt: skip
    assert solver._captured is not None
    solver._captured.chunk = 0  # (chunks: the same steps unrolled, tested below)
    solver.step(5)
    assert solver._captured.calls == 4 and graphs.count == 1


def test_a_captured_step_that_fails_to_compile_runs_eagerly_from_that_batch(caplog):
    """No working C++ compiler, say: the backend fails at the first call, before anything ran;
    the solver warns once and trains eagerly, starting with the batch the capture drew, so
    the run is the eager run."""
    import logging

    from caffe_alex.log import get_logger

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    eager = make_solver(MLP, SOLVER, _batches())
    failing = make_solver(MLP, SOLVER, _batches(), compile=failing_backend)
    get_logger().propagate = True  # let caplog see the warning
    try:
        with caplog.at_level(logging.WARNING, logger="caffe_alex"):
            eager.step(24)
            failing.step(24)
    finally:
        get_logger().propagate = False
    assert failing._captured is None and failing.iter == 24
    # (one record; pytest also hands it to a non-propagating logger's handler directly)
    warned = {id(r) for r in caplog.records if "captured training step failed" in r.getMessage()}
    assert len(warned) == 1
    for ours, reference in zip(_params(failing), _params(eager)):
        np.testing.assert_array_equal(ours, reference)


_LOGREG = """
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TRAIN }
  hdf5_data_param { source: "%(list)s" batch_size: 4 } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label" include { phase: TEST }
  hdf5_data_param { source: "%(list)s" batch_size: 5 } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "accuracy" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""
# a display every 5, a test pass every 7, a snapshot every 6, a rate that halves every 4
_SCHEDULE = """base_lr: 0.1 momentum: 0.9 weight_decay: 0.001 lr_policy: "step" gamma: 0.5
stepsize: 4 display: 5 test_interval: 7 test_iter: 2 snapshot: 6 max_iter: 40
solver_mode: CPU random_seed: 3"""


def logreg_net(folder) -> str:
    """_LOGREG reading 50 seeded rows of 6 features in 3 classes written into ``folder``."""
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(folder / "data.h5", "w") as h5:
        h5["data"] = rng.normal(size=(50, 6)).astype(np.float32)
        h5["label"] = rng.integers(0, 3, 50).astype(np.float32)
    (folder / "list.txt").write_text(f"{folder / 'data.h5'}\n")
    return _LOGREG % {"list": folder / "list.txt"}


def _logreg_solver(folder, backend, chunk: int, path: str = "loop"):
    from caffe_alex.formats.prototxt import parse_solver_text
    from caffe_alex.solvers import Solver

    text = (f"net_param {{ {logreg_net(folder)} }}\n{_SCHEDULE}\n"
            f'snapshot_prefix: "{folder / "snap"}"')  # fmt: skip
    solver = Solver(parse_solver_text(text), compile=backend)
    _chunked(solver, chunk, path)
    return solver


class _Messages:
    """The caffe_alex log's messages while in the ``with`` block, speeds and folders cut."""

    def __init__(self, folder):
        import logging

        self.folder, self.lines = str(folder), []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(self._plain(record.getMessage()))

    def _plain(self, message: str) -> str:
        import re

        return re.sub(r"\(\S+ iter/s, \S+ iters\)", "", message.replace(self.folder, "F"))

    def __enter__(self):
        from caffe_alex.log import get_logger

        log = get_logger()
        self.level = log.level
        log.setLevel("INFO")
        log.addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc):
        from caffe_alex.log import get_logger

        get_logger().removeHandler(self.handler)
        get_logger().setLevel(self.level)


@pytest.mark.parametrize("path", PATHS)
def test_chunks_train_as_single_steps_and_stop_where_the_solver_looks(tmp_path, path):
    """Several iterations per compiled call change nothing the user sees: the same weights,
    history and display, test passes and snapshots at the same iterations with the same
    figures, across ``step`` calls, as the same captured steps one call each (aot_eager
    runs both graphs op by op, so equal means equal)."""
    runs = {}
    for chunk in (0, 3):
        folder = tmp_path / f"chunk{chunk}"
        folder.mkdir()
        solver = _logreg_solver(folder, CountingAotEager(), chunk, path)
        heard = []

        def hear(it, loss, rate, per_s, heard=heard):
            heard.append((it, loss, rate))

        hear.reads_blobs = False  # (a callback that may read blobs keeps every step eager)
        solver.callbacks.append(hear)
        with _Messages(folder) as lines:
            solver.step(23)
            solver.step(9)
            solver.step(3)  # as long as a chunk: its last iteration is read, so none runs
        runs[chunk] = (solver, lines, sorted(p.name for p in folder.glob("snap*")), heard)
    (single, single_log, single_files, single_heard), (chunked, chunked_log, chunked_files,
                                                       chunked_heard) = runs.values()  # fmt: skip
    # every iteration but the displays and a step's last runs in a chunk of up to 3 that
    # ends before a display, a test pass, a snapshot or a step's end (1-3 and 4, 6, 7-9, 11,
    # 12-13, 14, ...; those cut short run fewer rows, or masked ones): no single step
    assert (chunked._captured.chunks, chunked._captured.calls) == (15, 0)
    assert single._captured.chunks == 0
    assert chunked.iter == single.iter == 35
    # the chunks' batches were taken from the HDF5 feed stacked (DataFeed.take), and counted
    for feed in (chunked.feeds["train"], single.feeds["train"]):
        assert feed.batches == feed.feed.position == 35
    # callbacks hear of each iteration done (a chunk: once, after its last) with the same figures
    assert [it for it, *_ in single_heard] == list(range(1, 36))
    assert [it for it, *_ in chunked_heard] == [1, 5, 6, 7, 10, 11, 12, 14, 15, 16, 18, 20, 21,
                                                22, 23, 24, 25, 26, 28, 30, 31, 32, 34, 35]
    assert set(chunked_heard) <= set(single_heard)
    assert chunked_log == single_log
    for blob in ("data", "ip", "loss"):  # the last iteration's, as Python reads them
        assert torch.equal(chunked.train_net.blobs[blob], single.train_net.blobs[blob])
    events = []  # (what, iteration) in the order logged
    for line in single_log:
        if line.startswith("Iteration") and ("Testing net" in line or "loss =" in line):
            events.append(("test" if "Testing" in line else "display",
                           int(line.split()[1].rstrip(","))))  # fmt: skip
        elif line.startswith("Snapshotting to binary proto file"):
            events.append(("snapshot", int(line.split("_iter_")[1].split(".")[0])))
    assert events == [("test", 0), ("display", 0), ("display", 5), ("snapshot", 6),
                      ("test", 7), ("display", 10), ("snapshot", 12), ("test", 14),
                      ("display", 15), ("snapshot", 18), ("display", 20), ("test", 21),
                      ("snapshot", 24), ("display", 25), ("test", 28), ("snapshot", 30),
                      ("display", 30)]  # fmt: skip
    # at 6, 12, ..., 30: the weights, the solver state and its feeds' positions, alike
    assert chunked_files == single_files and len(single_files) == 15
    for name in (n for n in single_files if n.endswith(".caffemodel")):
        assert _blobs(tmp_path / "chunk3" / name) == _blobs(tmp_path / "chunk0" / name)
    for ours, reference in zip(_params(chunked), _params(single)):
        np.testing.assert_array_equal(ours, reference)
    for ours, reference in zip(chunked.rule.history, single.rule.history):
        np.testing.assert_array_equal(ours.numpy(), reference.numpy())


@pytest.mark.parametrize("path", PATHS)
def test_chunks_run_in_a_row_until_the_solver_must_look_or_a_request_waits(monkeypatch, path):
    """Chunks follow each other without the Solver's loop between them (its callbacks hear
    of the last), up to RUN_CHUNKS of them, with the numbers of single steps; a request
    (here asked while the feed draws a batch, as a signal may) ends the row after the chunk
    under way, and the Solver honours it there."""
    from caffe_alex.solvers import captured

    text = 'type: "SGD" momentum: 0.9 base_lr: 0.05 weight_decay: 0.01 lr_policy: "fixed"'
    runs = [make_solver(MLP, text, _batches(40), compile=CountingAotEager()) for _ in range(2)]
    single, chunked = runs
    _chunked(single, 0), _chunked(chunked, 3, path)
    heard = {id(solver): [] for solver in runs}
    for solver in runs:
        hear = heard[id(solver)].append
        solver.callbacks.append(lambda it, *_, hear=hear: hear(it))
        solver.callbacks[-1].reads_blobs = False
        solver.step(31)
    # 0-29 as ten chunks in one row (a chunk must leave the step's last, 30, which runs
    # eagerly)
    assert chunked._captured.chunks == 10 and chunked._captured.calls == 0
    assert chunked.iter == single.iter == 31
    assert heard[id(chunked)] == [30, 31]
    assert heard[id(single)] == list(range(1, 32))
    for ours, reference in zip(_params(chunked), _params(single)):
        np.testing.assert_array_equal(ours, reference)

    monkeypatch.setattr(captured, "RUN_CHUNKS", 2)  # rows of two chunks
    solver = make_solver(MLP, text, _batches(40), compile=CountingAotEager())
    _chunked(solver, 3, path)
    its = []
    solver.callbacks.append(lambda it, *_: its.append(it))
    solver.callbacks[-1].reads_blobs = False
    solver.step(20)
    assert its == [6, 12, 18, 19, 20]  # rows 0-5, 6-11, 12-17; 18 alone; the last eagerly

    def asking(batches, at):  # a feed that asks for a stop while it hands out batch ``at``
        for k, batch in enumerate(batches):
            if k == at:
                solver.request("stop")
            yield batch

    monkeypatch.setattr(captured, "RUN_CHUNKS", 16)
    solver = make_solver(MLP, text, asking(_batches(40), 10), compile=CountingAotEager())
    _chunked(solver, 3, path)
    solver.step(31)
    # batch 10 is drawn by the chunk of iterations 9-11: the stop is taken after it
    assert solver.iter == 12 and solver._captured.chunks == 4


def _blobs(path) -> list[list[float]]:
    from caffe_alex.proto import caffe_pb2

    net = caffe_pb2.NetParameter.FromString(path.read_bytes())
    return [list(blob.data) for layer in net.layer for blob in layer.blobs]


def _warnings_of(run) -> list[str]:
    """The caffe_alex log's warnings while ``run()`` runs."""
    from caffe_alex.log import get_logger

    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    get_logger().addHandler(handler)
    try:
        run()
    finally:
        get_logger().removeHandler(handler)
    return warnings


def test_a_chunk_that_fails_to_compile_leaves_its_iterations_to_the_single_step():
    """The backend refuses the unrolled chunk's graph (the first it is given): the solver
    warns once, trains the chunk's batches one step each, and no further chunk is tried."""
    text = 'type: "SGD" momentum: 0.9 base_lr: 0.05 weight_decay: 0.01 lr_policy: "fixed"'
    single, refused = CountingAotEager(), RefusesGraph(0)
    runs = [make_solver(MLP, text, _batches(12), compile=backend) for backend in (single, refused)]
    _chunked(runs[0], 0), _chunked(runs[1], 3, "unrolled")
    warnings = _warnings_of(lambda: [solver.step(12) for solver in runs])
    assert [w for w in warnings if "chunk failed to compile" in w] == [warnings[0]]
    step = runs[1]._captured
    assert (step.chunk, step.chunks, step.calls, refused.count) == (0, 0, 11, 2)
    assert runs[0]._captured.calls == 11
    for ours, reference in zip(_params(runs[1]), _params(runs[0])):
        np.testing.assert_array_equal(ours, reference)


def test_a_loop_that_fails_to_compile_or_trace_leaves_the_chunks_unrolled(monkeypatch):
    """The backend refuses the loop's graph, or make_fx cannot trace the step: that chunk's
    batches train one step each, the chunks after it are unrolled, with a warning; the
    numbers are those of single steps."""
    from caffe_alex.solvers.looped import LoopedSteps

    text = 'type: "SGD" momentum: 0.9 base_lr: 0.05 weight_decay: 0.01 lr_policy: "fixed"'
    single = make_solver(MLP, text, _batches(12), compile=CountingAotEager())
    _chunked(single, 0)
    single.step(12)
    refused = RefusesGraph(0)
    failing = make_solver(MLP, text, _batches(12), compile=refused)
    warnings = _warnings_of(lambda: (_chunked(failing, 3), failing.step(12)))
    assert any("chunk failed to compile" in w for w in warnings)
    assert any("unrolled from now on" in w for w in warnings)
    # 0-2 refused (one step each: the single step's graph), 3-5, 6-8, 9-10 unrolled, 11 eager
    step = failing._captured
    assert (step.looped, step.chunk, step.chunks, step.calls, refused.count) == (
        None, 3, 3, 3, 3)  # fmt: skip
    for ours, reference in zip(_params(failing), _params(single)):
        np.testing.assert_array_equal(ours, reference)

    def untraceable(self, *args):
        raise RuntimeError("data-dependent control flow")

    monkeypatch.setattr(LoopedSteps, "_iteration", untraceable)
    traced = make_solver(MLP, text, _batches(12), compile=CountingAotEager())
    warnings = _warnings_of(lambda: (_chunked(traced, 3), traced.step(12)))
    assert any("could not be traced as one loop (RuntimeError: data-dependent" in w
               for w in warnings)  # fmt: skip
    assert (traced._captured.looped, traced._captured.chunks) == (None, 3)
    for ours, reference in zip(_params(traced), _params(single)):
        np.testing.assert_array_equal(ours, reference)


def test_a_feed_that_runs_out_inside_a_chunk_trains_on_what_it_gave():
    text = 'type: "SGD" momentum: 0.9 base_lr: 0.05 lr_policy: "fixed"'
    runs = []
    for chunk, path in ((0, "loop"), (4, "loop"), (4, "unrolled")):
        solver = make_solver(MLP, text, _batches(7), compile=CountingAotEager())
        _chunked(solver, chunk, path)
        with pytest.raises(StopIteration):
            solver.step(12)  # 0 alone, 1-4 a chunk, then only 5 and 6 come
        assert solver.iter == 7
        runs.append(_params(solver))
    for run in runs[1:]:
        for ours, reference in zip(run, runs[0]):
            np.testing.assert_array_equal(ours, reference)


def test_a_batch_that_fails_to_compile_inside_a_chunk_leaves_the_rest_to_the_eager_path():
    """Batch 4 has another shape: the chunk of 3-5 falls back to single steps, and the
    recompile for batch 4 fails: 4 and 5 (already drawn) train eagerly, each on its own
    gradients, nothing is lost."""
    batches = _batches(11)
    batches[4] = {"x": batches[4]["x"][:6], "label": batches[4]["label"][:6]}
    text = 'type: "SGD" momentum: 0.9 base_lr: 0.05 lr_policy: "fixed"'
    eager = make_solver(MLP, text, list(batches))
    solver = make_solver(MLP, text, batches, compile=RefusesGraph(2))
    solver._captured.chunk = 3
    eager.step(11)
    solver.step(11)  # 0-2 a chunk, 3 alone, 4 fails to compile: 4-10 eagerly
    assert solver.iter == 11 and solver._captured is None
    assert solver.feeds["train"].batches == 11  # every batch drawn was trained on
    for ours, reference in zip(_params(solver), _params(eager)):
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6)


def test_a_hand_given_batch_with_a_stray_key_is_refused_by_name():
    from caffe_alex.errors import CaffeAlexError

    batches = [{**b, "index": 3} for b in _batches(12)]
    solver = make_solver(MLP, 'base_lr: 0.05 lr_policy: "fixed"', batches,
                         compile=CountingAotEager())  # fmt: skip
    solver._captured.chunk = 3
    with pytest.raises(CaffeAlexError, match="'index' is not an input"):
        solver.step(12)


def test_a_callback_that_may_read_the_blobs_keeps_the_steps_eager():
    solver = make_solver(MLP, 'base_lr: 0.05 lr_policy: "fixed"', _batches(6),
                         compile=CountingAotEager())  # fmt: skip
    seen = []
    solver.callbacks.append(lambda *a: seen.append(solver.train_net.blobs["out"].clone()))
    solver.step(6)
    assert solver._captured.calls == 0 and len(seen) == 6
    assert not torch.equal(seen[0], seen[1])  # each iteration's own


class _AtenOps:
    """aot_eager, keeping the aten ops of each graph it is given."""

    def __init__(self):
        self.graphs: list[set[str]] = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd
        from torch._dynamo.backends.debugging import boxed_nop

        def keep(graph, inputs):  # (a loop's body and condition are graphs inside it)
            self.graphs.append({str(node.target) for module in graph.modules()
                                if isinstance(module, torch.fx.GraphModule)
                                for node in module.graph.nodes
                                if node.op == "call_function"})  # fmt: skip
            return boxed_nop(graph, inputs)

        return aot_autograd(fw_compiler=keep)(gm, example_inputs)


@pytest.mark.slow
def test_every_solver_of_a_process_gets_its_own_compiled_step():
    """Dynamo recompiles a code object at most recompile_limit times (8; 2 here, to keep the
    test short): were the captured steps of every solver one code, the solver after the
    limit would run its chunks uncompiled."""
    text = 'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed"'
    config = torch._dynamo.config  # (torch before 2.7 calls the limit cache_size_limit)
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{limit: 2}):
        for _ in range(3):
            backend = CountingAotEager()
            solver = make_solver(MLP, text, _batches(6), compile=backend)
            solver._captured.chunk = 3
            solver.step(5)  # 0-2 and 3 as chunks (one graph), the last eagerly
            assert (backend.count, solver._captured.chunks) == (1, 2)


def test_a_small_nets_compiled_step_and_chunk_call_no_matrix_product():
    """The step and the chunk of a net of tiny inner products hold no mm/addmm (a BLAS call
    from inductor's Python wrapper, microseconds each): their products are traced as multiply
    and sum (inner_product.py), which inductor fuses with the loss and the update."""
    backend = _AtenOps()
    runs = [make_solver(MLP, 'base_lr: 0.1 momentum: 0.9 lr_policy: "fixed"', _batches(12),
                        compile=backend) for _ in range(2)]  # fmt: skip
    _chunked(runs[1], 0)  # (single steps: their own graph)
    for solver in runs:
        solver.step(11)  # 0-9 as one loop, or one by one; the last eagerly
    assert (runs[0]._captured.chunks, runs[0]._captured.calls) == (1, 0)
    assert (runs[1]._captured.chunks, runs[1]._captured.calls) == (0, 10)
    assert len(backend.graphs) == 2
    assert "while_loop" in str(backend.graphs[0])
    for ops in backend.graphs:
        assert not any("mm" in op for op in ops), sorted(ops)
        assert "aten.sum.dim_IntList" in ops
