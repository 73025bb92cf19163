"""Caffe's update rules (SGD, Nesterov, AdaGrad, RMSProp, Adam) as functions of a blob's state:
the value its update subtracts and its histories after, computed out of place. The captured
step (captured.py) writes the histories back itself; the looped chunk (looped.py) carries them
from one iteration to the next. The operations and their order are those of the eager rules
(sgd.py, adagrad.py, rmsprop.py, adam.py), their scalars rounded to float32 as Caffe holds them.
"""

from __future__ import annotations

import numpy as np
import torch

from .sgd import _scalar

f32 = np.float32


class FunctionalRule:
    """``updated(grad, rate, held)`` for ``rule`` (an UpdateRule whose ``history`` it reads):
    ``held`` is ``histories(i)`` of the blob, ``rate`` its local rate (Adam's with its bias
    correction)."""

    def __init__(self, rule, param):
        self.rule, self.kind = rule, param.type
        self.momentum, self.delta = _scalar(param.momentum), _scalar(param.delta)
        self.momentum2, self.rms_decay = _scalar(param.momentum2), _scalar(param.rms_decay)
        self.one_plus = float(f32(1) + f32(param.momentum))  # Nesterov's (1 + momentum)
        self.one_minus = float(f32(1) - f32(param.momentum))  # Adam's (1 - beta1)
        self.one_minus2 = float(f32(1) - f32(param.momentum2))  # Adam's (1 - beta2)
        self.one_minus_rms = float(f32(1) - f32(param.rms_decay))

    def histories(self, i: int) -> list[torch.Tensor]:
        """What the rule's update of blob ``i`` changes besides the blob."""
        if self.kind == "Adam":
            return [self.rule.history[i], self.rule.second(i)]
        return [self.rule.history[i]]

    def updated(self, grad: torch.Tensor, rate, held: list[torch.Tensor]):
        """Caffe's ComputeUpdateValue: (the value to subtract, the histories after)."""
        kind, h = self.kind, held[0]
        if kind in ("SGD", "Nesterov"):
            new = h * self.momentum + grad * rate
            if kind == "SGD":
                return new, [new]
            return new * self.one_plus - h * self.momentum, [new]  # (1 + mom.) V_new - mom. V
        if kind == "Adam":
            m = h * self.momentum + grad * self.one_minus
            v = held[1] * self.momentum2 + grad * grad * self.one_minus2
            return m / (v.sqrt() + self.delta) * rate, [m, v]
        if kind == "AdaGrad":
            new = h + grad * grad
        else:  # RMSProp
            new = h * self.rms_decay + grad * grad * self.one_minus_rms
        return grad / (new.sqrt() + self.delta) * rate, [new]
