"""The Solver's log lines keep Caffe's shapes (what tools/extra/parse_log.py matches), tests run
when due, and stop/snapshot requests are honoured between iterations."""

from __future__ import annotations

import io
import logging
import re

import numpy as np
import pytest
import torch

from caffe_alex.errors import CaffeAlexError
from caffe_alex.log import setup_logging
from caffe_alex.solvers.display import SmoothedLoss

from .helpers import batches, make_solver, tiny_net

SOLVER = """base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 average_loss: 2
max_iter: {max_iter} display: {display} test_iter: 2 test_interval: 2
snapshot_prefix: "{prefix}" """


def _run(tmp_path, display=2, max_iter=4):
    stream = io.StringIO()
    setup_logging(logging.INFO, stream)
    text = SOLVER.format(prefix=tmp_path / "m", display=display, max_iter=max_iter)
    solver = make_solver(
        tiny_net(), text, None, feeds={"train": batches(20), "test": [batches(20, 1)]}
    )
    return solver, stream


@pytest.fixture(autouse=True)
def _restore_logging():
    yield
    setup_logging(logging.INFO)


def test_log_lines_parse_like_caffe(tmp_path):
    solver, stream = _run(tmp_path)
    solver.solve()
    text = stream.getvalue()
    prefix = r"I\d{4} \d\d:\d\d:\d\d\.\d{6} +\d+ [\w.]+:\d+\] "
    for pattern in [
        r"Iteration 0 \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+",
        r"Iteration 2 \([\d.e+-]+ iter/s, [\d.e+-]+s/2 iters\), loss = [\d.e+-]+",
        r"    Train net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)",
        r"Iteration 2, lr = 0\.01",
        r"Iteration 0, Testing net \(#0\)",
        r"Iteration 4, Testing net \(#0\)",
        r"    Test net output #0: loss = [\d.e+-]+ \(\* 1 = [\d.e+-]+ loss\)",
        r"Snapshotting to binary proto file .*m_iter_4\.caffemodel",
        r"Snapshotting solver state to binary proto file .*m_iter_4\.solverstate",
        r"Iteration 4, loss = [\d.e+-]+",
        r"Optimization Done\.",
    ]:
        assert re.search(prefix + pattern + "$", text, re.M), pattern


def test_smoothed_loss_is_caffes_running_mean(tmp_path):
    solver, stream = _run(tmp_path, display=1)
    losses = []
    solver.callbacks.append(lambda it, loss, rate, ips: losses.append(loss))
    solver.step(4)
    shown = [float(v) for v in re.findall(r"\), loss = (\S+)", stream.getvalue())]
    assert shown == pytest.approx(losses, rel=1e-5)


def test_smoothed_loss_reads_a_chunks_row_of_losses_as_its_iterations():
    """A captured chunk adds its eight losses as one row: the mean is the same as for losses
    added one by one, whatever mix of rows and single losses is pending at a flush."""
    draws = np.random.default_rng(0).random(23).astype(np.float32)
    one_by_one, mixed = SmoothedLoss(average=5), SmoothedLoss(average=5)
    for i, loss in enumerate(draws):
        one_by_one.add_lazily(i, torch.tensor(loss))
        if i % 7 == 3:  # a read in the middle, as a display does
            assert one_by_one.value
    for first, count in [(0, 1), (1, 3), (4, 8), (12, 1), (13, 8), (21, 2)]:
        row = torch.from_numpy(draws[first : first + count])
        mixed.add_lazily(first, row if count > 1 else row[0])
    assert mixed.value == one_by_one.value
    single, reference = SmoothedLoss(average=3), SmoothedLoss(average=3)
    single.add_lazily(0, torch.from_numpy(draws[:8]))  # a row alone at a flush
    for i in range(8):
        reference.add_lazily(i, torch.tensor(draws[i]))
    assert single.value == reference.value != SmoothedLoss(average=3).value


def test_a_row_of_losses_is_added_as_one_by_one_bit_for_bit():
    """``add_row`` (float32 array operations and one sequential accumulate) against ``add`` of
    each loss in turn: windows of 1-11, losses across six decades, rows cut anywhere, the
    window filling inside a row or before it."""
    rng = np.random.default_rng(1)
    for _ in range(200):
        average, start = int(rng.integers(1, 12)), int(rng.integers(0, 5))
        count = int(rng.integers(1, 120))
        losses = (rng.random(count) * 10 ** rng.uniform(-3, 3, count)).astype(np.float32)
        one_by_one, rows = SmoothedLoss(average, start), SmoothedLoss(average, start)
        for i, loss in enumerate(losses):
            one_by_one.add(np.float32(loss), start + i)
        position = 0
        while position < count:
            cut = int(rng.integers(1, 70))
            rows.add_row(losses[position : position + cut], start + position)
            position += cut
        assert rows.value == one_by_one.value
        assert [float(v) for v in rows._losses] == [float(v) for v in one_by_one._losses]


def test_a_flush_adds_consecutive_iterations_as_one_row(monkeypatch):
    """An eager step adds its losses one 0-d tensor each: a flush takes them as one row (one
    ``add_row``, not one per iteration), and a chunk's row after them joins it."""
    smoothed, rows = SmoothedLoss(average=4), []
    real = SmoothedLoss.add_row
    monkeypatch.setattr(SmoothedLoss, "add_row",
                        lambda self, losses, first: (rows.append((first, len(losses))),
                                                     real(self, losses, first)))  # fmt: skip
    for i in range(50):
        smoothed.add_lazily(i, torch.tensor(float(i % 5)))
    smoothed.add_lazily(50, torch.arange(8, dtype=torch.float32))
    reference = SmoothedLoss(average=4)
    for i, loss in enumerate([float(i % 5) for i in range(50)] + list(range(8))):
        reference.add(np.float32(loss), i)
    assert smoothed.value == reference.value and rows == [(0, 58)]
    for i in (70, 71, 72, 90):  # a gap: each run of consecutive iterations is its own row
        smoothed.add_lazily(i, torch.tensor(i / 7))
        reference.add(np.float32(i / 7), i)
    assert smoothed.value == reference.value and rows[1:] == [(70, 3), (90, 1)]


def test_stop_and_snapshot_requests(tmp_path):
    solver, stream = _run(tmp_path, max_iter=100)
    solver.callbacks.append(lambda it, *rest: it == 3 and solver.request("snapshot"))
    solver.callbacks.append(lambda it, *rest: it == 5 and solver.request("stop"))
    solver.solve()
    assert solver.iter == 5
    assert (tmp_path / "m_iter_3.solverstate").exists()
    assert (tmp_path / "m_iter_5.solverstate").exists()  # snapshot_after_train
    assert "Optimization stopped early." in stream.getvalue()


def test_test_iter_must_match_test_nets(tmp_path):
    with pytest.raises(CaffeAlexError, match="test_iter"):
        text = f"base_lr: 0.1 lr_policy: 'fixed' test_net_param {{ {tiny_net()} }}"
        make_solver(tiny_net(), text, batches(2))


def test_debug_info_logs_every_layer_after_one_with_parameters(tmp_path):
    stream = io.StringIO()
    setup_logging(logging.INFO, stream)
    text = SOLVER.format(prefix=tmp_path / "m", display=1, max_iter=1) + " debug_info: true"
    feeds = {"train": batches(2), "test": [batches(2, 1)]}
    make_solver(tiny_net(), text, None, feeds=feeds).step(1)
    log = stream.getvalue()
    assert re.search(r"\[Forward\] Layer ip, param blob \S+ data: ", log)
    assert re.search(r"\[Forward\] Layer loss, top blob loss data: ", log)  # the layer after ip
    assert "[Backward] All net params (data, diff)" in log
