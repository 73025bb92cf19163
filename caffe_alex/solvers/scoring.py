"""Caffe's scoring loop, shared by Solver::Test (a solver's test pass: SolverTests) and
caffe.cpp's test() (``caffe-alex test``): run a number of batches and sum every value of the
net's outputs, batch by batch, in float32 as Caffe's test_score vector holds them, and the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..log import get_logger
from .display import log_outputs

log = get_logger()
f32 = np.float32


@dataclass
class Scores:
    """``sums``: every output value summed over the batches (float32, flattened in output
    order); ``loss``: the losses summed (float32); ``batches``: how many ran."""

    sums: np.ndarray
    loss: np.float32
    batches: int

    @property
    def means(self) -> np.ndarray:
        return self.sums / f32(max(self.batches, 1))


def score(forward, batches, iterations: int, names, *, each=None, stop=None,
          start=None) -> Scores | None:  # fmt: skip
    """Run ``iterations`` batches from ``batches`` through ``forward(batch)`` -> (outputs by
    name, loss tensor or None), without gradients; sum the values of the outputs ``names``.
    ``each(i, values)``: called with batch i's flat values (float32 array), as caffe.cpp logs
    each; ``stop()``: asked before each batch, True ends the loop early (returns None).
    ``start``: (sums tensor, loss, batches) of the pass's first batches, scored already (a
    captured solver's loop: looped.py), the rest from there."""
    sums, loss, done = (None, f32(0), 0) if start is None else start
    with torch.no_grad():
        for i in range(done, iterations):
            if stop is not None and stop():
                return None
            outputs, batch_loss = forward(next(batches))
            if batch_loss is not None:
                loss += f32(batch_loss.item())
            parts = [outputs[n].detach().float().reshape(-1) for n in names]
            flat = torch.cat(parts) if parts else torch.zeros(0)
            sums = flat if sums is None else sums + flat
            if each is not None:
                each(i, flat.cpu().numpy())
    values = sums.cpu().numpy() if sums is not None else np.zeros(0, np.float32)
    return Scores(values, f32(loss), iterations)


class SolverTests:
    """Solver::Test over a solver's test ``nets``: when a test is due, and each net's pass with
    Caffe's log lines. ``forward(index, batch, grad)``: the solver's run of test net ``index``;
    ``requests`` (requests.py) are taken before each batch, a stop ending the pass."""

    def __init__(self, param, nets, feeds, forward, requests):
        self.param, self.nets, self.feeds = param, nets, feeds
        self._forward, self._requests = forward, requests
        self.looped: dict = {}  # test net index -> its LoopedScores (a captured solver's)

    def due(self, iteration: int) -> bool:
        interval = self.param.test_interval
        return (
            bool(interval)
            and iteration % interval == 0
            and (iteration > 0 or self.param.test_initialization)
        )

    def run(self, index: int, iteration: int, ranks, snapshot) -> dict:
        """test_iter[index] batches of test net ``index``: log and return the mean outputs
        ({} when a stop ended it); ``snapshot()`` takes a snapshot asked meanwhile."""
        log.info("Iteration %d, Testing net (#%d)", iteration, index)
        net, iters = self.nets[index], self.param.test_iter[index]
        with_loss = self.param.test_compute_loss

        def stop() -> bool:
            return self._requests.during_test(ranks, snapshot)

        start, feed = None, self.feeds[index]
        if index in self.looped and iters > 1:  # all but the last batch as compiled loops
            looped = self.looped[index].run(feed, iters - 1, stop)
            if looped is None:
                log.info("Test interrupted.")
                return {}
            sums, loss, done, unscored = looped
            start = (sums, f32(loss.item()), done)
            if self.looped[index].broken:  # its batches first, eagerly, then the feed's
                del self.looped[index]
                feed = _Prepended(unscored, feed)
        passes = iter(range(iters - (start[2] if start else 0), 0, -1))  # left, this one too

        def forward(batch):
            # only the pass's last batch need leave its blobs (engines.py's skip_blobs)
            outputs, loss = self._forward(index, batch, grad=False, keep_blobs=next(passes) == 1)
            return outputs, loss if with_loss else None

        scores = score(forward, feed, iters, net.output_names, stop=stop,
                       start=start)  # fmt: skip
        if scores is None:
            log.info("Test interrupted.")
            return {}
        if with_loss:
            log.info("Test loss: %g", scores.loss / f32(iters))
        return log_outputs(net, "Test", scores.means)


class _Prepended:
    """``batches`` handed out first, then ``feed``'s."""

    def __init__(self, batches: list, feed):
        self.batches, self.feed = list(batches), feed

    def __next__(self):
        return self.batches.pop(0) if self.batches else next(self.feed)
