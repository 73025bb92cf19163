"""RMSProp (Caffe's RMSPropSolver): H = rms_decay*H + (1-rms_decay)*g^2;
update = local_rate * g / (sqrt(H) + delta)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CaffeAlexError
from .sgd import UpdateRule, _scalar, require_no_momentum


class RMSProp(UpdateRule):
    type_name = "RMSProp"

    def check(self) -> None:
        require_no_momentum(self.param, "RMSProp")
        if not 0 <= self.param.rms_decay < 1:
            raise CaffeAlexError(f"rms_decay ({self.param.rms_decay}) must lie in [0, 1)")

    def compute_update(self, i: int, rate: float) -> None:
        grad, history = self.infos[i].param.grad, self.history[i]
        decay = _scalar(self.param.rms_decay)
        update = self.scratch("update", i)
        torch.mul(grad, grad, out=update)
        history.mul_(decay).add_(update, alpha=float(np.float32(1) - np.float32(decay)))
        torch.sqrt(history, out=update)
        update.add_(_scalar(self.param.delta))
        torch.div(grad, update, out=update)
        torch.mul(update, self.local_rate(i, rate), out=grad)
