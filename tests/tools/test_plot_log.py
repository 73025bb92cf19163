"""Training logs are readable by Caffe's tools/extra/parse_log.py: a Python model of that
script's line handling (written from the log format: glog time stamp, "Solving" start line,
"Iteration N", "lr = X", "Train/Test net output #i: name = v") reads a log in Caffe's format and
one written by our solver, and caffe_alex.plot_log gives the same rows; plot-log draws them."""

from __future__ import annotations

import math
import re
from datetime import datetime

import pytest
from click.testing import CliRunner

from caffe_alex.cli import main
from caffe_alex.tools.plot_log import parse_lines
from tests.commands.test_train import write_tiny_problem
from tests.data.full_disk import kill_midway

# -- a model of parse_log.py ------------------------------------------------------------------
# Its number class is digits, '.', 'e', 'E', '+' and '-' only (no nan/inf).
CAFFE_ITER = re.compile(r"Iteration (\d+)")
CAFFE_TRAIN = re.compile(r"Train net output #(\d+): (\S+) = ([-+.0-9eE]+)")
CAFFE_TEST = re.compile(r"Test net output #(\d+): (\S+) = ([-+.0-9eE]+)")
CAFFE_LR = re.compile(r"lr = ([-+]?[0-9]*\.?[0-9]+([eE]?[-+]?[0-9]+)?)")


def _stamp(line: str, year: int) -> datetime:
    """The glog time stamp as parse_log reads it: the first two whitespace-separated words
    (a line with fewer than two words raises IndexError, which the script does not catch)."""
    words = line.strip().split()
    month, day = int(words[0][1:3]), int(words[0][3:])
    clock, _, micro = words[1].rpartition(".")
    h, m, s = (int(x) for x in clock.split(":"))
    return datetime(year, month, day, h, m, s, int(micro))


def caffe_parse_log(lines: list[str], year: int = 2000):
    start = next(_stamp(line, year) for line in lines if "Solving" in line)
    iteration, rate, train, test = -1, math.nan, [], []
    for line in lines:
        found = CAFFE_ITER.search(line)
        if found:
            iteration = float(found.group(1))
        if iteration == -1:
            continue
        try:
            seconds = (_stamp(line, year) - start).total_seconds()
        except ValueError:
            continue
        found = CAFFE_LR.search(line)
        if found:
            rate = float(found.group(1))
        for regex, rows in ((CAFFE_TRAIN, train), (CAFFE_TEST, test)):
            found = regex.search(line)
            if found:
                if not rows or rows[-1]["NumIters"] != iteration or found.group(2) in rows[-1]:
                    rows.append({"NumIters": iteration, "Seconds": seconds, "LearningRate": rate})
                rows[-1][found.group(2)] = float(found.group(3))
    for rows in (train, test):  # the script copies the second row's rate into the first
        if len(rows) > 1:
            rows[0]["LearningRate"] = rows[1]["LearningRate"]
    return train, test


# -- a log in Caffe's format (LeNet-like run, written for this test) ---------------------------
CAFFE_LOG = """\
I0210 13:39:20.100000 42 caffe.cpp:218] Using GPUs 0
I0210 13:39:20.500000 42 solver.cpp:44] Initializing solver from parameters:
test_iter: 100
base_lr: 0.01
I0210 13:39:21.000000 42 solver.cpp:56] Solving LeNet
I0210 13:39:21.000100 42 solver.cpp:57] Learning Rate Policy: inv
I0210 13:39:21.100000 42 solver.cpp:397] Iteration 0, Testing net (#0)
I0210 13:39:22.000000 42 solver.cpp:464]     Test net output #0: accuracy = 0.0937
I0210 13:39:22.000001 42 solver.cpp:464]     Test net output #1: loss = 2.30259 (* 1 = 2.30259 loss)
I0210 13:39:22.100000 42 solver.cpp:218] Iteration 0 (-1.2e-05 iter/s, 1.0s/100 iters), loss = 2.31
I0210 13:39:22.100001 42 solver.cpp:237]     Train net output #0: loss = 2.31 (* 1 = 2.31 loss)
I0210 13:39:22.100002 42 sgd_solver.cpp:105] Iteration 0, lr = 0.01
I0210 13:39:24.500000 42 solver.cpp:218] Iteration 100 (41.67 iter/s, 2.4s/100 iters), loss = 0.61
I0210 13:39:24.500001 42 solver.cpp:237]     Train net output #0: loss = 0.58 (* 1 = 0.58 loss)
I0210 13:39:24.500002 42 sgd_solver.cpp:105] Iteration 100, lr = 0.00992565
I0210 13:39:26.900000 42 solver.cpp:397] Iteration 200, Testing net (#0)
I0210 13:39:27.500000 42 solver.cpp:464]     Test net output #0: accuracy = 0.8123
I0210 13:39:27.500001 42 solver.cpp:464]     Test net output #1: loss = 0.52 (* 1 = 0.52 loss)
I0210 13:39:27.600000 42 solver.cpp:218] Iteration 200 (41.67 iter/s, 2.4s/100 iters), loss = 5.1e-1
I0210 13:39:27.600001 42 solver.cpp:237]     Train net output #0: loss = 0.49 (* 1 = 0.49 loss)
I0210 13:39:27.600002 42 sgd_solver.cpp:105] Iteration 200, lr = 0.00985258
I0210 13:39:28.000000 42 solver.cpp:447] Snapshotting to binary proto file lenet_iter_200.caffemodel
I0210 13:39:28.100000 42 solver.cpp:310] Iteration 200, loss = 0.47
I0210 13:39:28.100001 42 solver.cpp:330] Iteration 200, Testing net (#0)
I0210 13:39:28.600000 42 solver.cpp:397]     Test net output #0: accuracy = 0.8244
I0210 13:39:28.600001 42 solver.cpp:397]     Test net output #1: loss = 0.49 (* 1 = 0.49 loss)
I0210 13:39:28.600002 42 solver.cpp:315] Optimization Done.
"""


def _rows_equal(ours: list[dict], theirs: list[dict]) -> None:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        a = {k: v for k, v in a.items() if k != "TestNet"}
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-12), key


def test_caffe_format_rows():
    lines = CAFFE_LOG.splitlines(keepends=True)
    log = parse_lines(lines)
    assert [(r["NumIters"], r["loss"], r["LearningRate"]) for r in log.train] == [
        (0, 2.31, 0.01),
        (100, 0.58, 0.01),  # the rate line follows the outputs
        (200, 0.49, 0.00992565),
    ]
    assert [(r["NumIters"], r["accuracy"], r["loss"]) for r in log.test] == [
        (0, 0.0937, 2.30259),
        (200, 0.8123, 0.52),
        (200, 0.8244, 0.49),
    ]
    assert [r["Seconds"] for r in log.test] == [1.0, 6.5, 7.6]
    # the first row (no "lr =" logged yet) takes the second row's rate, as parse_log does
    assert [r["LearningRate"] for r in log.test] == [0.00992565, 0.00992565, 0.00985258]
    assert log.loss == [(0, 2.31), (100, 0.61), (200, 0.51), (200, 0.47)]
    assert log.lr == [(0, 0.01), (100, 0.00992565), (200, 0.00985258)]
    train, test = caffe_parse_log(lines)
    _rows_equal(log.train, train)
    _rows_equal(log.test, test)


def test_new_year_and_non_numbers():
    text = (
        "I1231 23:59:59.500000 1 solver.py:1] Solving net\n"
        "I1231 23:59:59.900000 1 solver.py:2] Iteration 0, lr = 1e-3\n"
        "I1231 23:59:59.900001 1 solver.py:3]     Train net output #0: loss = nan\n"
        "I0101 00:00:00.500000 1 solver.py:2] Iteration 10, lr = 1e-3\n"
        "I0101 00:00:00.500001 1 solver.py:3]     Train net output #0: loss = 1.5e+00\n"
    )
    log = parse_lines(text.splitlines())
    assert [r["NumIters"] for r in log.train] == [0, 10]
    assert math.isnan(log.train[0]["loss"]) and log.train[1]["loss"] == 1.5
    assert log.train[1]["Seconds"] == pytest.approx(1.0)


@pytest.mark.slow
def test_plot_log_command(tmp_path):
    path = tmp_path / "caffe.log"
    path.write_text(CAFFE_LOG)
    out = tmp_path / "curves.png"
    result = CliRunner().invoke(main, ["plot-log", str(path), str(out), "--csv"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "3 train rows, 3 test rows" in result.output
    header = (tmp_path / "curves.test").read_text().splitlines()[0]
    assert header == "NumIters,Seconds,LearningRate,TestNet,accuracy,loss"


def test_plot_log_rejects_a_log_without_iterations(tmp_path):
    path = tmp_path / "empty.log"
    path.write_text("I0210 13:39:20.100000 42 caffe.cpp:218] Use CPU.\n")
    result = CliRunner().invoke(main, ["plot-log", str(path), str(tmp_path / "x.png")])
    assert result.exit_code == 1
    assert result.stderr == f"caffe-alex: error: {path}: no training iterations found in the log\n"


@pytest.mark.slow
@pytest.mark.parametrize("ext,magic", [("svg", b"<?xml"), ("pdf", b"%PDF"), ("", b"\x89PNG")])
def test_plot_log_formats_by_extension_and_refuses_unknown_ones(tmp_path, ext, magic):
    path = tmp_path / "caffe.log"
    path.write_text(CAFFE_LOG)
    out = tmp_path / (f"curves.{ext}" if ext else "curves")
    assert CliRunner().invoke(main, ["plot-log", str(path), str(out)]).exit_code == 0
    assert out.read_bytes().startswith(magic)
    result = CliRunner().invoke(main, ["plot-log", str(path), str(tmp_path / "c.xyz")])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"caffe-alex: error: {tmp_path / 'c.xyz'}: cannot draw a")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["caffe.log", out.name])


SLOW_PLOT = """
import os, sys, time
import click
from caffe_alex.cli import main
click.echo = lambda *args, **kwargs: None  # stdout says "writing" and nothing else
real_fsync, calls = os.fsync, []
def stall(fd):  # write number STALL_AT is in its temporary; its rename has not happened
    calls.append(fd)
    if len(calls) < STALL_AT:
        return real_fsync(fd)
    print("writing", flush=True)
    time.sleep(300)
os.fsync = stall
main(["plot-log", "--csv", LOG, OUT])
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("stall_at,written", [(1, []), (2, ["curves.png"])], ids=["image", "csv"])
def test_kill_during_plot_log_keeps_the_old_files_and_the_next_run_cleans_up(
    tmp_path, stall_at, written
):
    log, out = tmp_path / "caffe.log", tmp_path / "curves.png"
    log.write_text(CAFFE_LOG)
    old = {"curves.png": b"old image", "curves.train": b"old train", "curves.test": b"old test"}
    for name, data in old.items():
        (tmp_path / name).write_bytes(data)
    code = SLOW_PLOT.replace("LOG", repr(str(log))).replace("OUT", repr(str(out)))
    pid = kill_midway(code.replace("STALL_AT", str(stall_at)))
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(left) == 1 and f".caffe-alex-{pid}-" in left[0]
    for name, data in old.items():  # each file is the old one or the new one, whole
        assert ((tmp_path / name).read_bytes() == data) != (name in written), name
    assert (tmp_path / "curves.png").read_bytes()[:4] == (b"\x89PNG" if written else b"old ")
    result = CliRunner().invoke(main, ["plot-log", "--csv", str(log), str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["caffe.log", *sorted(old)]


# -- a log written by our solver --------------------------------------------------------------
def test_our_training_log(tmp_path):
    files = write_tiny_problem(tmp_path, max_iter=6, snapshot=0)
    log_path = tmp_path / "train.log"
    result = CliRunner().invoke(
        main, ["train", "-solver", str(files["solver"]), "--log", str(log_path)]
    )
    assert result.exit_code == 0, result.output
    lines = log_path.read_text().splitlines(keepends=True)
    train, test = caffe_parse_log(lines)
    # display 2, test_interval 3, max_iter 6: train rows at 0, 2, 4 (and 6 from Solve's last
    # forward has no "Train net output"), test rows at 0, 3 and 6
    assert [r["NumIters"] for r in train] == [0, 2, 4]
    assert [r["NumIters"] for r in test] == [0, 3, 6]
    assert set(test[0]) == {"NumIters", "Seconds", "LearningRate", "accuracy", "loss"}
    assert [r["LearningRate"] for r in train] == [0.1, 0.1, 0.1]  # rate lines follow outputs
    assert all(0 <= r["accuracy"] <= 1 for r in test)
    ours = parse_lines(lines)
    _rows_equal(ours.train, train)
    _rows_equal(ours.test, test)
    assert [i for i, _ in ours.lr] == [0, 2, 4] and ours.lr[-1][1] == 0.05  # step at 4
    assert [i for i, _ in ours.loss] == [0, 2, 4, 6]
    assert all(r["Seconds"] >= 0 for r in train + test)
