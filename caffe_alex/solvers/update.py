"""Caffe's SGDSolver::ApplyUpdate: one update of every learnable parameter from its gradient.

In Caffe's order: the rate from lr_policy; the gradients clipped by their global L2 norm
(clip_gradients); then per parameter, normalised by 1/iter_size, regularised (weight_decay x
decay_mult, L2 or L1), turned into the update by the rule with its history (rules.py), and
subtracted. Arithmetic keeps Caffe's float32 steps (f32) where they change the result.
"""

from __future__ import annotations

import numpy as np
import torch

from ..log import get_logger
from .lr_policy import learning_rate
from .sgd import UpdateRule

log = get_logger()
f32 = np.float32


class ParameterUpdate:
    """The update step for ``learnable`` (ParamInfo list) under ``param`` (SolverParameter)."""

    def __init__(self, param, learnable, rule: UpdateRule):
        self.param, self.learnable, self.rule = param, learnable, rule

    def apply(self, iteration: int, current_step: int, display: bool = False):
        """Update the parameters once; returns (rate, current_step) for the next call."""
        rate, current_step = learning_rate(self.param, iteration, current_step)
        if display:
            log.info("Iteration %d, lr = %g", iteration, rate)
        grads = self._gradients()
        self._clip(grads)
        self.rule.iter = iteration
        for i, (info, grad) in enumerate(zip(self.learnable, grads)):
            self._normalize_and_regularize(info, grad)
            self.rule.compute_update(i, rate)
        with torch.no_grad():
            torch._foreach_sub_([info.param for info in self.learnable], grads)
        return rate, current_step

    def _gradients(self) -> list[torch.Tensor]:
        grads = []
        for info in self.learnable:
            if info.param.grad is None:  # unused or frozen: Caffe's diff stays zero
                info.param.grad = torch.zeros_like(info.param)
            grads.append(info.param.grad)
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

    def _normalize_and_regularize(self, info, grad) -> None:
        if self.param.iter_size != 1:
            grad.mul_(float(f32(1) / f32(self.param.iter_size)))
        decay = float(f32(self.param.weight_decay) * f32(info.decay_mult))
        if decay:
            data = info.param.detach()
            grad.add_(data if self.param.regularization_type == "L2" else data.sign(), alpha=decay)
