"""AdaDelta (Caffe's AdaDeltaSolver). History set 1 holds E[g^2], set 2 E[dx^2]:
  E[g^2] = m*E[g^2] + (1-m)*g^2;  dx = g * sqrt((E[dx^2] + delta) / (E[g^2] + delta))
  E[dx^2] = m*E[dx^2] + (1-m)*dx^2;  update = local_rate * dx
Unlike the paper, Caffe multiplies by the learning rate too (base_lr: 1 gives the paper's rule).
"""

from __future__ import annotations

import numpy as np
import torch

from .sgd import UpdateRule, _scalar


class AdaDelta(UpdateRule):
    type_name = "AdaDelta"
    history_sets = 2

    def compute_update(self, i: int, rate: float) -> None:
        grad, grads_sq, updates_sq = self.infos[i].param.grad, self.history[i], self.second(i)
        momentum, delta = _scalar(self.param.momentum), _scalar(self.param.delta)
        rest = float(np.float32(1) - np.float32(momentum))
        update, temp = self.scratch("update", i), self.scratch("temp", i)
        torch.mul(grad, grad, out=update)
        grads_sq.mul_(momentum).add_(update, alpha=rest)
        torch.add(updates_sq, delta, out=update)
        torch.add(grads_sq, delta, out=temp)
        update.div_(temp).sqrt_()
        grad.mul_(update)
        torch.mul(grad, grad, out=update)
        updates_sq.mul_(momentum).add_(update, alpha=rest)
        grad.mul_(self.local_rate(i, rate))
