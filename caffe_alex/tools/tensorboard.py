"""TensorBoard scalars of a training run: the numbers of Caffe's display and test lines.

The numbers are read from the log lines with plot-log's parser (plot_log.LogParser), both while
a run trains (a logging handler on rank 0's log) and when an existing log, ours or Caffe's, is
converted afterwards, so the events of a run and those of its log are the same numbers, at
Caffe's display and test intervals, and the solver needs no hook of its own.

Tags: ``loss`` (the smoothed loss of the display line), ``learning_rate``,
``iterations_per_second`` (the display line's), ``images_per_second`` (that times the images
an iteration takes, known while training: batch x iter_size x ranks), ``train/NAME`` for each
train net output of the display, ``test/NAME`` for each output of test net #0 (``test1/NAME``
for net #1, ...). Steps are Caffe's iteration numbers. The events are written with
``torch.utils.tensorboard.SummaryWriter`` (it needs the ``tensorboard`` package).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile

from ..errors import CaffeAlexError, describe
from ..formats.atomic import remove_path, temporary_path
from ..formats.file_errors import write_error
from .plot_log import LogParser, Point

FLUSH_SECONDS = 10  # a running training's events reach the disk at least this often


def summary_writer():
    """torch.utils.tensorboard.SummaryWriter, or a one-line error naming the missing package."""
    try:
        # imported on use: it needs the optional tensorboard package, and only --tensorboard
        # asks for it
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CaffeAlexError(
            "TensorBoard events need the tensorboard package (pip install tensorboard)"
        ) from None
    return SummaryWriter


def check_folder(folder) -> str:
    """Create ``folder`` if needed and make sure a file can be written in it, before any work:
    a one-line error otherwise."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise CaffeAlexError(
            f"cannot write TensorBoard events to {folder}: {describe(exc)}"
        ) from None
    return folder


def scalars(point: Point, images_per_iteration: float | None = None) -> list[tuple[str, float]]:
    """The (tag, value) pairs one log Point becomes."""
    value = point.value
    if point.kind == "loss":
        return [("loss", value)]
    if point.kind == "lr":
        return [("learning_rate", value)]
    if point.kind == "speed":
        pairs = [("iterations_per_second", value)]
        if images_per_iteration:
            pairs.append(("images_per_second", value * images_per_iteration))
        return pairs
    if point.kind == "train":
        return [(f"train/{point.name}", value)]
    prefix = "test" if point.test_net == 0 else f"test{point.test_net}"
    return [(f"{prefix}/{point.name}", value)]


class Events:
    """A SummaryWriter fed with log Points."""

    def __init__(self, folder, images_per_iteration: float | None = None):
        self.folder = check_folder(folder)
        self.images_per_iteration = images_per_iteration
        self.writer = summary_writer()(self.folder, flush_secs=FLUSH_SECONDS)
        self.count = 0

    def add(self, point: Point, walltime: float | None = None) -> None:
        for tag, value in scalars(point, self.images_per_iteration):
            self.writer.add_scalar(tag, value, point.iteration, walltime=walltime)
            self.count += 1

    def close(self) -> None:
        self.writer.close()


class _Follow(logging.Handler):
    """Turns the log records of a running training into events as they are logged."""

    def __init__(self, events: Events):
        super().__init__()
        self.events, self.parser = events, LogParser()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            for line in record.getMessage().splitlines():
                for point in self.parser.feed(line):
                    self.events.add(point, record.created)
            if "Testing net" in record.getMessage() or "Optimization Done" in record.getMessage():
                self.events.writer.flush()
        except Exception:  # a logging handler must not break the training it watches
            self.handleError(record)


@contextlib.contextmanager
def training_events(folder, logger: logging.Logger, images_per_iteration=None):
    """Write the numbers ``logger`` reports while the block runs into ``folder`` (nothing when
    ``folder`` is empty)."""
    if not folder:
        yield None
        return
    events = Events(folder, images_per_iteration)
    handler = _Follow(events)
    logger.addHandler(handler)
    try:
        yield events
    finally:
        logger.removeHandler(handler)
        events.close()


def convert_log(log_path, folder) -> tuple[str, int]:
    """Write the numbers of the log at ``log_path`` as one events file in ``folder``; returns
    (its path, the number of scalars). The file is written in a temporary folder beside it and
    moved in when complete. Wall times keep the log's spacing, ending at the log's
    modification time (a glog stamp has no year)."""
    folder = check_folder(folder)
    SummaryWriter = summary_writer()
    parser = LogParser()
    try:
        with open(log_path, encoding="utf-8", errors="replace") as f:
            points = [point for line in f for point in parser.feed(line)]
        end = os.path.getmtime(log_path)
    except OSError as exc:
        raise CaffeAlexError(f"cannot read {log_path}: {describe(exc)}") from None
    last = max((p.seconds for p in points), default=0.0)
    tmp = temporary_path(os.path.join(folder, "events"))
    try:
        os.mkdir(tmp)
        writer = SummaryWriter(tmp)
        count = 0
        for point in points:
            for tag, value in scalars(point):
                writer.add_scalar(tag, value, point.iteration, walltime=end - last + point.seconds)
                count += 1
        writer.close()
        (name,) = os.listdir(tmp)
        target = os.path.join(folder, name)
        os.replace(os.path.join(tmp, name), target)
    except OSError as exc:
        raise write_error(folder, exc) from None
    finally:
        remove_path(tmp)
    return target, count
