"""Caffe's scoring loop, shared by Solver::Test (a solver's test pass) and caffe.cpp's test()
(``caffe-alex test``): run a number of batches and sum every value of the net's outputs, batch
by batch, in float32 as Caffe's test_score vector holds them, and the loss."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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


def score(forward, batches, iterations: int, names, *, each=None, stop=None) -> Scores | None:
    """Run ``iterations`` batches from ``batches`` through ``forward(batch)`` -> (outputs by
    name, loss tensor or None), without gradients; sum the values of the outputs ``names``.
    ``each(i, values)``: called with batch i's flat values (float32 array), as caffe.cpp logs
    each; ``stop()``: asked before each batch, True ends the loop early (returns None)."""
    sums, loss = None, f32(0)
    with torch.no_grad():
        for i in range(iterations):
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
    return Scores(values, loss, iterations)
