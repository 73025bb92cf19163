"""AdaGrad (Caffe's AdaGradSolver): H += g^2; update = local_rate * g / (sqrt(H) + delta)."""

from __future__ import annotations

import torch

from .sgd import UpdateRule, _scalar, require_no_momentum


class AdaGrad(UpdateRule):
    type_name = "AdaGrad"

    def check(self) -> None:
        require_no_momentum(self.param, "AdaGrad")

    def compute_update(self, i: int, rate: float) -> None:
        grad, history = self.infos[i].param.grad, self.history[i]
        update = self.scratch("update", i)
        torch.mul(grad, grad, out=update)
        history.add_(update)
        torch.sqrt(history, out=update)
        update.add_(_scalar(self.param.delta))
        torch.div(grad, update, out=update)
        torch.mul(update, self.local_rate(i, rate), out=grad)
