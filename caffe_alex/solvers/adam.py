"""Adam (Caffe's AdamSolver): history set 1 is m, set 2 is v (momentum = beta1, momentum2 =
beta2, delta = eps):  m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2;
update = local_rate * sqrt(1-b2^t)/(1-b1^t) * m / (sqrt(v) + eps), with t = iter + 1."""

from __future__ import annotations

import math

import numpy as np
import torch

from .sgd import UpdateRule, _scalar

f32 = np.float32


class Adam(UpdateRule):
    type_name = "Adam"
    history_sets = 2

    def correction(self) -> float:
        # pow(float, int) is computed in double; the result is kept in a float
        t = self.iter + 1
        beta1, beta2 = _scalar(self.param.momentum), _scalar(self.param.momentum2)
        return float(f32(math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)))

    def compute_update(self, i: int, rate: float) -> None:
        grad, m, v = self.infos[i].param.grad, self.history[i], self.second(i)
        beta1, beta2 = _scalar(self.param.momentum), _scalar(self.param.momentum2)
        temp = self.scratch("temp", i)
        m.mul_(beta1).add_(grad, alpha=float(f32(1) - f32(beta1)))
        torch.mul(grad, grad, out=temp)
        v.mul_(beta2).add_(temp, alpha=float(f32(1) - f32(beta2)))
        torch.sqrt(v, out=temp)
        temp.add_(_scalar(self.param.delta))
        torch.div(m, temp, out=temp)
        scale = float(f32(self.local_rate(i, rate)) * f32(self.correction()))
        torch.mul(temp, scale, out=grad)
