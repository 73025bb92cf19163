"""What the solver shows while it trains, in Caffe's words so tools/extra/parse_log.py reads our
logs: the smoothed loss of the display lines (Solver::UpdateSmoothedLoss), the display lines
themselves with their speed, and the 'Train/Test net output #i: name = v (* w = l loss)' lines.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from ..log import get_logger

log = get_logger()
f32 = np.float32


class SmoothedLoss:
    """The mean of the last ``average_loss`` iteration losses, in float32 as Caffe keeps it.

    Losses are added as device tensors and read back only when the value is asked for, so
    that no iteration waits on the device.
    """

    def __init__(self, average: int, start_iter: int = 0):
        self.average, self.start_iter = average, start_iter
        self._losses: list = []
        self._value = f32(0)
        self._pending: list = []

    def add_lazily(self, iteration: int, loss: torch.Tensor) -> None:
        """The loss of ``iteration`` (a 0-d tensor), or of consecutive iterations from it (a
        1-d tensor: a captured chunk's)."""
        self._pending.append((iteration, loss))

    def flush(self) -> None:
        """Read back the losses added lazily (one device sync for all of them)."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        if len(pending) == 1 and pending[0][1].dim() == 0:  # (each iteration, for a callback)
            self.add(f32(pending[0][1].item()), pending[0][0])
            return
        losses = [loss.reshape(-1) for _, loss in pending]
        values = (losses[0] if len(losses) == 1 else torch.cat(losses)).detach().cpu()
        values = values.to(torch.float32).numpy()
        # one add_row per run of consecutive iterations (an eager step's losses come one each)
        position, start, end = 0, pending[0][0], pending[0][0]
        for first, loss in pending:
            if first != end:
                self.add_row(values[position : position + end - start], start)
                position, start, end = position + end - start, first, first
            end += loss.numel()
        self.add_row(values[position:], start)

    @property
    def value(self) -> float:
        self.flush()
        return float(self._value)

    def add_row(self, losses: np.ndarray, first: int) -> None:
        """The float32 losses of iterations ``first``, ``first`` + 1, ...: what ``add`` of
        each in turn gives, bit for bit, without a Python step per iteration once the window
        is full (a captured chunk's row: 64 of them). The window's terms (each loss less the
        one it replaces, over ``average``) are float32 operations on arrays, and the running
        value their sum in order, each partial sum rounded to float32 (``add.accumulate`` is
        sequential), as Caffe's UpdateSmoothedLoss adds them one by one."""
        k = 0
        while k < len(losses) and len(self._losses) < self.average:  # the first ones: a mean
            self.add(losses[k], first + k)
            k += 1
        rest = losses[k:]
        if not len(rest):
            return
        average = self.average
        oldest = (first + k - self.start_iter) % average  # where the oldest loss sits
        window = np.concatenate([np.roll(np.array(self._losses, dtype=f32), -oldest), rest])
        terms = (rest - window[: len(rest)]) / f32(average)
        running = np.add.accumulate(np.concatenate([[self._value], terms]).astype(f32),
                                    dtype=f32)  # fmt: skip
        self._value = running[-1]
        after = (first + len(losses) - self.start_iter) % average
        self._losses = list(np.roll(window[-average:], after))

    def add(self, loss, iteration: int) -> None:
        if len(self._losses) < self.average:
            self._losses.append(loss)
            size = len(self._losses)
            self._value = f32((self._value * f32(size - 1) + loss) / f32(size))
        else:
            index = (iteration - self.start_iter) % self.average
            self._value = f32(self._value + (loss - self._losses[index]) / f32(self.average))
            self._losses[index] = loss


class Progress:
    """What Step's loop shows and tells its callbacks: the smoothed loss, the display line's
    speed (since the last display line), the images per second; ``batch_size``: the train
    batch's, once seen."""

    def __init__(self, param):
        self.param = param
        self.loss = SmoothedLoss(param.average_loss)
        self.batch_size = None
        self._clock = (time.perf_counter(), 0)  # (when, iteration) of the last display

    def see_batch(self, batch: dict) -> None:
        """Learn the train batch's size from its first batch (its tensors' first axis)."""
        if self.batch_size is None:
            self.batch_size = next((int(v.shape[0]) for v in batch.values()), 1)

    def restart(self, iteration: int) -> None:
        """A new Step: the loss smoothed afresh and the speed measured from here."""
        self.loss = SmoothedLoss(self.param.average_loss, iteration)
        self._clock = (time.perf_counter(), iteration)

    def due(self, iteration: int) -> bool:
        return bool(self.param.display) and iteration % self.param.display == 0

    def show(self, iteration: int, net, blobs) -> None:
        """Caffe's display lines: speed and smoothed loss, then the train net's outputs."""
        since, first = self._clock
        lapse = time.perf_counter() - since
        per_s = (iteration - first) / (lapse or 1)
        log.info("Iteration %d (%g iter/s, %gs/%d iters), loss = %g", iteration, f32(per_s),
                 f32(lapse), self.param.display, self.loss.value)  # fmt: skip
        self._clock = (time.perf_counter(), iteration)
        log_outputs(net, "Train", blobs=blobs)

    def show_last(self, iteration: int, loss) -> None:
        """Solve's display after the last update, with ``loss`` (a tensor or None) of one more
        forward pass."""
        value = f32(loss.item()) if loss is not None else f32(0)
        self.loss.add(value, iteration)
        log.info("Iteration %d, loss = %g", iteration, self.loss.value)

    def notify(self, callbacks, iteration: int, rate: float, seconds: float, ranks: int):
        """Each of ``callbacks`` with (iteration, smoothed loss, rate, images per second)."""
        loss = self.loss.value
        images = (self.batch_size or 1) * self.param.iter_size * ranks / max(seconds, 1e-9)
        for callback in callbacks:
            callback(iteration, loss, rate, images)


def log_outputs(net, kind: str, values=None, blobs=None) -> dict:
    """Log every element of the net's outputs (``values`` flattened in output order, or the
    blobs of the last forward: ``blobs(name)``, by default the module's) with its loss note;
    return them by output name."""
    weights = net.blob_loss_weights
    if values is None:
        blobs = blobs or net.blobs.__getitem__
        parts = [blobs(n).detach().float().reshape(-1) for n in net.output_names]
        values = torch.cat(parts).cpu().numpy() if parts else np.zeros(0, np.float32)
    result, position = {}, 0
    for name in net.output_names:
        size = int(np.prod(net.blob_shapes[name], dtype=np.int64))
        chunk = values[position : position + size]
        weight = f32(weights.get(name, 0))
        for k, value in enumerate(chunk):
            note = f" (* {weight:g} = {f32(weight * value):g} loss)" if weight else ""
            log.info("    %s net output #%d: %s = %g%s", kind, position + k, name, value, note)
        result[name] = float(chunk[0]) if size == 1 else [float(v) for v in chunk]
        position += size
    return result
