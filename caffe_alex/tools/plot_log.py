"""Read a training log (ours or Caffe's: glog lines) into rows, and plot its curves.

The rows are those Caffe's tools/extra/parse_log.py makes: one per iteration with train net
outputs and one per test pass, each with NumIters, Seconds (since the "Solving ..." line, or
the first glog time stamp without one) and LearningRate (the last ``lr = `` seen; the first
row takes the second's, as parse_log does since no rate is logged before it). We also keep the
smoothed loss of ``Iteration N (...), loss = L`` lines and the test net index of ``Testing net
(#k)``. The expressions are written from the line formats.
"""

from __future__ import annotations

import csv
import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime

from ..errors import CaffeAlexError, reading
from ..formats.atomic import atomic_path

_NUMBER = r"[-+]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf)"
# glog prefix: severity letter, MMDD, wall time with microseconds (no year)
STAMP = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6})")
ITERATION = re.compile(r"Iteration (\d+)")
SPEED = re.compile(rf"Iteration \d+ \(({_NUMBER}) iter/s, ")  # Caffe's display line since 2017
SMOOTHED_LOSS = re.compile(rf"Iteration \d+(?: \([^)]*\))?, loss = ({_NUMBER})")
LEARNING_RATE = re.compile(rf"\blr = ({_NUMBER})")
TESTING = re.compile(r"Testing net \(#(\d+)\)")
TRAIN_OUTPUT = re.compile(rf"Train net output #(\d+): (\S+) = ({_NUMBER})")
TEST_OUTPUT = re.compile(rf"Test net output #(\d+): (\S+) = ({_NUMBER})")


@dataclass
class TrainingLog:
    train: list[dict] = field(default_factory=list)  # NumIters, Seconds, LearningRate, outputs
    test: list[dict] = field(default_factory=list)  # the same plus TestNet
    loss: list[tuple[int, float]] = field(default_factory=list)  # smoothed display loss
    lr: list[tuple[int, float]] = field(default_factory=list)
    speed: list[tuple[int, float]] = field(default_factory=list)  # iterations per second


class _Clock:
    """Seconds since the first stamped line; the year is unknown, so a month going backwards
    means the log crossed New Year."""

    def __init__(self):
        self.start = self.last = None
        self.solving = False
        self.year = 2000  # a leap year, so that a 29 February stamp parses

    def seconds(self, match, solving: bool) -> float:
        month, day, hh, mm, ss, us = (int(g) for g in match.groups())
        if self.last is not None and month < self.last.month:
            self.year += 1
        stamp = datetime(self.year, month, day, hh, mm, ss, us)
        self.last = stamp
        if self.start is None or (solving and not self.solving):
            self.start, self.solving = stamp, solving  # parse_log counts from "Solving ..."
        return (stamp - self.start).total_seconds()


def _add(rows: list[dict], iteration, seconds, rate, name, value, extra=None) -> None:
    """Put an output on the current row, or start a row at a new iteration (or when the name
    repeats, as the next test pass at the same iteration does)."""
    row = rows[-1] if rows else None
    if row is None or row["NumIters"] != iteration or name in row:
        row = {"NumIters": iteration, "Seconds": seconds, "LearningRate": rate, **(extra or {})}
        rows.append(row)
    row[name] = value


@dataclass
class Point:
    """One number a log line reports: ``kind`` is "loss" (the smoothed loss of a display
    line), "lr", "speed" (iterations per second of a display line), "train" or "test" (a net
    output, named ``name``; ``test_net`` says which test net)."""

    kind: str
    iteration: int
    value: float
    name: str = ""
    test_net: int = 0
    seconds: float = 0.0


class LogParser:
    """Reads a log line by line (``feed`` returns the Points each line reports), so that a
    running training can be followed as well as a finished log read; ``finish`` returns the
    TrainingLog."""

    def __init__(self):
        self.log, self._clock = TrainingLog(), _Clock()
        self.iteration: int | None = None
        self.rate, self.seconds, self.test_net = math.nan, 0.0, 0

    def feed(self, line: str) -> list[Point]:
        log, points = self.log, []
        stamp = STAMP.match(line)
        if stamp:
            self.seconds = self._clock.seconds(stamp, "Solving" in line)
        found = ITERATION.search(line)
        if found:
            self.iteration = int(found.group(1))
        iteration, seconds = self.iteration, self.seconds
        if iteration is None:  # nothing counts before the first iteration line
            return points
        if found := LEARNING_RATE.search(line):
            self.rate = float(found.group(1))
            log.lr.append((iteration, self.rate))
            points.append(Point("lr", iteration, self.rate, seconds=seconds))
        if found := SPEED.search(line):
            log.speed.append((iteration, float(found.group(1))))
            points.append(Point("speed", iteration, float(found.group(1)), seconds=seconds))
        if found := SMOOTHED_LOSS.search(line):
            log.loss.append((iteration, float(found.group(1))))
            points.append(Point("loss", iteration, float(found.group(1)), seconds=seconds))
        if found := TESTING.search(line):
            self.test_net = int(found.group(1))
        if found := TRAIN_OUTPUT.search(line):
            name, value = found.group(2), float(found.group(3))
            _add(log.train, iteration, seconds, self.rate, name, value)
            points.append(Point("train", iteration, value, name, seconds=seconds))
        if found := TEST_OUTPUT.search(line):
            name, value = found.group(2), float(found.group(3))
            _add(log.test, iteration, seconds, self.rate, name, value, {"TestNet": self.test_net})
            points.append(Point("test", iteration, value, name, self.test_net, seconds))
        return points

    def finish(self) -> TrainingLog:
        log = self.log
        first = log.lr[0][1] if log.lr else math.nan
        for rows in (log.train, log.test):
            # parse_log's fix: the first row (before any "lr =") takes the second's rate
            if len(rows) > 1:
                rows[0]["LearningRate"] = rows[1]["LearningRate"]
            for row in rows:
                if math.isnan(row["LearningRate"]):
                    row["LearningRate"] = first
        return log


def parse_lines(lines) -> TrainingLog:
    parser = LogParser()
    for line in lines:
        parser.feed(line)
    return parser.finish()


def parse_log(path) -> TrainingLog:
    with reading(path), open(path, encoding="utf-8", errors="replace") as f:
        return parse_lines(f)


def write_csv(rows: list[dict], path) -> None:
    """Rows as parse_log.py's CSV (columns of the first row first)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)


def _series(rows: list[dict], name: str):
    points = [(r["NumIters"], r[name]) for r in rows if name in r]
    return [p[0] for p in points], [p[1] for p in points]


def _names(rows: list[dict], word: str) -> list[str]:
    skip = {"NumIters", "Seconds", "LearningRate", "TestNet"}
    names = dict.fromkeys(k for r in rows for k in r if k not in skip)
    return [n for n in names if word in n.lower()]


def image_format(out_path) -> str:
    """The image format ``out_path``'s extension names (PNG without one), checked against what
    matplotlib writes: the image goes to a temporary first, whose name says nothing."""
    from matplotlib.backend_bases import FigureCanvasBase  # on use: a heavy import

    fmt = os.path.splitext(os.fspath(out_path))[1][1:].lower() or "png"
    known = FigureCanvasBase.get_supported_filetypes()
    if fmt not in known:
        raise CaffeAlexError(
            f"{out_path}: cannot draw a '.{fmt}' image; use one of "
            + ", ".join(f".{k}" for k in sorted(known))
        )
    return fmt


def plot(log: TrainingLog, out_path, title: str | None = None) -> None:
    """Loss (smoothed train loss, train and test loss outputs), accuracy (outputs whose name
    holds 'acc') and learning rate against iterations, in one image, written atomically."""
    fmt = image_format(out_path)
    import matplotlib  # imported on use: a heavy import (~0.5 s with pyplot)

    matplotlib.use("Agg")  # before pyplot, which is imported on use for the same reason
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(3, 1, figsize=(8, 10), sharex=True)
    if log.loss:
        ax_loss.plot(*zip(*log.loss), label="train loss (smoothed)")
    for kind, rows in (("train", log.train), ("test", log.test)):
        for name in _names(rows, "loss"):
            ax_loss.plot(*_series(rows, name), marker="." if kind == "test" else None,
                         label=f"{kind} {name}")  # fmt: skip
        for name in _names(rows, "acc"):
            ax_acc.plot(*_series(rows, name), marker=".", label=f"{kind} {name}")
    if log.lr:
        ax_lr.plot(*zip(*log.lr), drawstyle="steps-post", label="learning rate")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy"), (ax_lr, "learning rate")):
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(loc="best", fontsize="small")
    ax_lr.set_xlabel("iteration")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        with atomic_path(out_path) as tmp:
            fig.savefig(tmp, dpi=100, format=fmt)
    finally:
        plt.close(fig)
