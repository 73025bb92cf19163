"""Caffe's SGDSolver::ApplyUpdate: one update of every learnable parameter from its gradient.

In Caffe's order: the rate from lr_policy; the gradients clipped by their global L2 norm
(clip_gradients); then per parameter, normalised by 1/iter_size, regularised (weight_decay x
decay_mult, L2 or L1), turned into the update by the rule with its history (rules.py), and
subtracted. Arithmetic keeps Caffe's float32 steps (f32) where they change the result.

The steps run over all parameters at once (``torch._foreach_*``, one call per step and per
distinct multiplier instead of a Python loop over the blobs): each parameter still sees
Caffe's operations in Caffe's order, so the numbers are those of the loop.
"""

from __future__ import annotations

import numpy as np
import torch

from ..log import get_logger
from .lr_policy import learning_rate
from .rules import RULES
from .sgd import UpdateRule

log = get_logger()
f32 = np.float32


def net_update(param, net) -> ParameterUpdate:
    """The update of ``net``'s learnable parameters by ``param``'s rule (rules.py); a parameter
    with lr_mult 0 computes no diff, as in Caffe."""
    learnable = net.learnable_params()
    for info in learnable:
        if info.lr_mult == 0:
            info.param.requires_grad_(False)
    return ParameterUpdate(param, learnable, RULES[param.type](learnable, param))


class ParameterUpdate:
    """The update step for ``learnable`` (ParamInfo list) under ``param`` (SolverParameter)."""

    def __init__(self, param, learnable, rule: UpdateRule):
        self.param, self.learnable, self.rule = param, learnable, rule
        self.params = [info.param for info in learnable]
        # each blob's weight_decay x decay_mult as Caffe rounds it, and L2 (else L1)
        self.decays = [float(f32(param.weight_decay) * f32(info.decay_mult)) for info in learnable]
        self._decays = {d: i for d, i in same_values(self.decays).items() if d}  # decay -> blobs
        self.l2 = param.regularization_type == "L2"
        iter_size = param.iter_size
        self._normalize = float(f32(1) / f32(iter_size)) if iter_size != 1 else None

    def apply(self, iteration: int, current_step: int, display: bool = False):
        """Update the parameters once; returns (rate, current_step) for the next call."""
        rate, current_step = learning_rate(self.param, iteration, current_step)
        if display:
            log.info("Iteration %d, lr = %g", iteration, rate)
        grads = self._gradients()
        with torch.no_grad():
            self._clip(grads)
            self.rule.iter = iteration
            self._normalize_and_regularize(grads)
            self.rule.compute_updates(grads, rate)
            torch._foreach_sub_(self.params, grads)
        return rate, current_step

    def _gradients(self) -> list[torch.Tensor]:
        grads = []
        for param in self.params:
            if param.grad is None:  # unused or frozen: Caffe's diff stays zero
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        return grads

    def _clip(self, grads) -> None:
        clip = f32(self.param.clip_gradients)
        if clip < 0 or not grads:
            return
        norms = torch._foreach_norm(grads)
        l2norm = f32(torch.stack(norms).float().pow(2).sum().sqrt().item())
        if l2norm > clip:
            scale = f32(clip / l2norm)
            log.info("Gradient clipping: scaling down gradients (L2 norm %g > %g) by scale "
                     "factor %g", l2norm, clip, scale)  # fmt: skip
            torch._foreach_mul_(grads, float(scale))

    def _normalize_and_regularize(self, grads) -> None:
        if self._normalize is not None and grads:
            torch._foreach_mul_(grads, self._normalize)
        for decay, blobs in self._decays.items():  # (under no_grad: no detach needed)
            data = [self.params[i] for i in blobs]
            if not self.l2:
                data = torch._foreach_sign(data)
            torch._foreach_add_([grads[i] for i in blobs], data, alpha=decay)


def same_values(values) -> dict:
    """{value: [indices holding it]}, in first-seen order."""
    groups: dict = {}
    for index, value in enumerate(values):
        groups.setdefault(value, []).append(index)
    return groups
