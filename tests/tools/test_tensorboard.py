"""TensorBoard events of ``train --tensorboard`` and ``plot-log --tensorboard``, read back with
TensorBoard's own EventAccumulator, equal the numbers of the training log; rank 0 alone writes
them; a folder that cannot be written, or a missing tensorboard package, is one line and
nothing is written."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from caffe_alex.cli import main
from caffe_alex.tools import tensorboard
from caffe_alex.tools.plot_log import parse_lines, parse_log
from tests.commands.test_train import write_tiny_problem
from tests.tools.test_plot_log import CAFFE_LOG


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_events(folder) -> dict[str, list[tuple[int, float, float]]]:
    """tag -> [(step, value, wall time)] of every events file in ``folder``."""
    files = sorted(p for p in os.listdir(folder) if p.startswith("events.out.tfevents."))
    assert len(files) == 1, files
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(e.step, e.value, e.wall_time) for e in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }


def f32(pairs) -> list[tuple[int, float]]:
    """(step, value) pairs as TensorBoard stores them (float32 values)."""
    return [(int(step), float(np.float32(value))) for step, value in pairs]


def points(events, tag) -> list[tuple[int, float]]:
    return [(step, value) for step, value, _ in events[tag]]


def series(rows: list[dict], name: str, test_net: int | None = None) -> list[tuple[int, float]]:
    return f32(
        (r["NumIters"], r[name])
        for r in rows
        if name in r and (test_net is None or r["TestNet"] == test_net)
    )


def check_events_equal_the_log(events, log) -> None:
    assert points(events, "loss") == f32(log.loss)
    assert points(events, "learning_rate") == f32(log.lr)
    assert points(events, "iterations_per_second") == f32(log.speed)
    train_names = {k for r in log.train for k in r} - {"NumIters", "Seconds", "LearningRate"}
    test_names = {k for r in log.test for k in r} - {"NumIters", "Seconds", "LearningRate",
                                                      "TestNet"}  # fmt: skip
    for name in train_names:
        assert points(events, f"train/{name}") == series(log.train, name)
    for name in test_names:
        assert points(events, f"test/{name}") == series(log.test, name, 0)
    expected = {"loss", "learning_rate", "iterations_per_second"}
    expected |= {f"train/{n}" for n in train_names} | {f"test/{n}" for n in test_names}
    assert set(events) - {"images_per_second"} == expected


def test_training_writes_the_logs_numbers(tmp_path):
    files = write_tiny_problem(tmp_path, max_iter=6, snapshot=0)
    log_path, folder = tmp_path / "train.log", tmp_path / "runs" / "tiny"
    result = run("train", "--solver", files["solver"], "--log", log_path, "--tensorboard", folder)
    assert result.exit_code == 0, result.output
    log = parse_log(log_path)
    events = read_events(folder)
    check_events_equal_the_log(events, log)
    # display 2, test_interval 3, max_iter 6
    assert [s for s, _ in points(events, "loss")] == [0, 2, 4, 6]
    assert [s for s, _ in points(events, "test/accuracy")] == [0, 3, 6]
    assert [s for s, _ in points(events, "learning_rate")] == [0, 2, 4]
    # batch 8, iter_size 1, one process
    assert points(events, "images_per_second") == f32((i, 8 * v) for i, v in log.speed)
    assert len(log.speed) == 3 and len(log.test) == 3

    # the log converted afterwards gives the same numbers
    converted = tmp_path / "converted"
    result = run("plot-log", log_path, "--tensorboard", converted)
    assert result.exit_code == 0, result.output
    again = read_events(converted)
    assert {t: points(again, t) for t in again} == {
        t: points(events, t) for t in events if t != "images_per_second"
    }


@pytest.mark.slow
def test_a_caffe_log_converts(tmp_path):
    path = tmp_path / "caffe.log"
    path.write_text(CAFFE_LOG)
    os.utime(path, (1_700_000_000, 1_700_000_000))
    folder = tmp_path / "events"
    result = run("plot-log", path, tmp_path / "curves.png", "--tensorboard", folder)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "curves.png").is_file()  # the plot is still drawn
    log = parse_lines(CAFFE_LOG.splitlines())
    events = read_events(folder)
    check_events_equal_the_log(events, log)
    assert points(events, "test/accuracy") == f32([(0, 0.0937), (200, 0.8123), (200, 0.8244)])
    assert points(events, "iterations_per_second") == f32([(0, -1.2e-05), (100, 41.67),
                                                           (200, 41.67)])  # fmt: skip
    # wall times keep the log's spacing (Seconds since "Solving"), ending at the file's time
    walls = [w for _, _, w in events["test/accuracy"]]
    assert walls[-1] == pytest.approx(1_700_000_000)
    assert np.diff(walls) == pytest.approx(np.diff([r["Seconds"] for r in log.test]))
    assert [n for n in os.listdir(folder) if n.startswith(".")] == []  # no temporary left


def test_test_nets_beyond_the_first_get_their_own_prefix():
    lines = [
        "I0210 13:39:21.100000 42 solver.cpp:397] Iteration 0, Testing net (#1)",
        "I0210 13:39:22.000000 42 solver.cpp:464]     Test net output #0: accuracy = 0.5",
    ]
    parser = tensorboard.LogParser()
    found = [p for line in lines for p in parser.feed(line)]
    assert [tensorboard.scalars(p) for p in found] == [[("test1/accuracy", 0.5)]]


@pytest.mark.subprocess  # ranks are processes
def test_only_rank_zero_writes_events(tmp_path):
    from tests.solvers.test_distributed import Ranks

    files = write_tiny_problem(tmp_path, max_iter=4, snapshot=0)
    folder = tmp_path / "events"
    args = ["--solver", files["solver"], "--tensorboard", folder, "--dist-backend", "gloo"]
    ranks = Ranks(tmp_path, [args, args])
    assert ranks.wait() == [0, 0], ranks.log(0) + ranks.log(1)
    events = read_events(folder)  # one file
    speeds = points(events, "iterations_per_second")
    assert [s for s, _ in speeds] == [0, 2]
    # 2 ranks x batch 8 images per iteration
    assert points(events, "images_per_second") == [(s, float(np.float32(16 * v)))
                                                   for s, v in speeds]  # fmt: skip


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("caffe-alex: error: ")
    return lines[0]


def test_an_unwritable_folder_is_one_line_before_any_work(tmp_path):
    files = write_tiny_problem(tmp_path, max_iter=2, snapshot=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folder = blocker / "events"  # under a file: no user can create it
    line = _one_error_line(run("train", "--solver", files["solver"], "--tensorboard", folder))
    expected = f"cannot write TensorBoard events to {folder}: Not a directory"
    assert line == f"caffe-alex: error: {expected}"
    assert not list(tmp_path.glob("tiny_iter_*"))  # no training ran
    log = tmp_path / "caffe.log"
    log.write_text(CAFFE_LOG)
    line = _one_error_line(run("plot-log", log, "--tensorboard", folder))
    assert "cannot write TensorBoard events to" in line


def test_a_failed_conversion_leaves_nothing(tmp_path, monkeypatch):
    log = tmp_path / "caffe.log"
    log.write_text(CAFFE_LOG)
    folder = tmp_path / "events"

    def fail(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tensorboard.os, "replace", fail)
    line = _one_error_line(run("plot-log", log, "--tensorboard", folder))
    assert line == f"caffe-alex: error: cannot write {folder}: No space left on device"
    assert os.listdir(folder) == []


def test_a_missing_tensorboard_package_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    files = write_tiny_problem(tmp_path, max_iter=2, snapshot=0)
    line = _one_error_line(run("train", "--solver", files["solver"], "--tensorboard",
                               tmp_path / "events"))  # fmt: skip
    assert "need the tensorboard package (pip install tensorboard)" in line
    assert not (tmp_path / "events").exists()


def test_plot_log_needs_an_output_or_a_folder(tmp_path):
    log = tmp_path / "caffe.log"
    log.write_text(CAFFE_LOG)
    result = run("plot-log", log)
    assert result.exit_code == 2 and "give an OUTPUT image, --tensorboard DIR, or both" in (
        result.output
    )
