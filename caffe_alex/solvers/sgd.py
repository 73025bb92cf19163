"""SGD and Nesterov (Caffe's SGDSolver / NesterovSolver ComputeUpdateValue), and the base class
of every update rule.

A rule keeps Caffe's ``history_`` blobs (the ones a .solverstate stores, in Caffe's order: one
per learnable parameter, then a second set for AdaDelta and Adam) and writes the update into
``param.grad`` the way Caffe's ComputeUpdateValue writes the diff; the solver then subtracts it
(Blob::Update). Scalars are rounded to float32 first, as Caffe holds them in Dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import CaffeAlexError

f32 = np.float32


class UpdateRule:
    """Base: history tensors, scratch buffers (Caffe's update_/temp_, made on first use)."""

    type_name = ""
    history_sets = 1  # AdaDelta and Adam keep a second set after the first

    def __init__(self, infos, param):
        self.infos, self.param = list(infos), param
        self.iter = 0  # the solver's iteration; Adam's bias correction reads it
        self.history = [
            torch.zeros_like(info.param, memory_format=torch.contiguous_format)
            for _ in range(self.history_sets)
            for info in self.infos
        ]
        self._scratch: dict[tuple[str, int], torch.Tensor] = {}
        self._lr_groups: dict[float, list[int]] = {}  # lr_mult -> the blobs that have it
        for i, info in enumerate(self.infos):
            self._lr_groups.setdefault(info.lr_mult, []).append(i)
        self.check()

    def check(self) -> None:
        """Caffe's constructor sanity checks (raise CaffeAlexError naming the field)."""

    def scratch(self, kind: str, i: int) -> torch.Tensor:
        buf = self._scratch.get((kind, i))
        like = self.infos[i].param
        if buf is None or buf.device != like.device or buf.shape != like.shape:
            buf = self._scratch[(kind, i)] = torch.empty_like(like)
        return buf

    def local_rate(self, i: int, rate: float) -> float:
        return float(f32(rate) * f32(self.infos[i].lr_mult))

    def second(self, i: int) -> torch.Tensor:
        return self.history[len(self.infos) + i]

    def to(self, device) -> UpdateRule:
        self.history = [h.to(device) for h in self.history]
        self._scratch.clear()
        return self

    def compute_update(self, i: int, rate: float) -> None:
        raise NotImplementedError

    def compute_updates(self, grads: list[torch.Tensor], rate: float) -> None:
        """compute_update for every parameter (a rule may do them all at once)."""
        for i in range(len(self.infos)):
            self.compute_update(i, rate)

    def rate_groups(self, rate: float) -> list[tuple[float, list[int]]]:
        """(local rate, parameter indices) for each distinct lr_mult."""
        return [(self.local_rate(blobs[0], rate), blobs) for blobs in self._lr_groups.values()]


def _scalar(value) -> float:
    return float(f32(value))


class SGD(UpdateRule):
    """V <- momentum*V + local_rate*g; update = V. The rate lives inside the history, so a
    change of rate only affects new gradients (unlike torch.optim.SGD)."""

    type_name = "SGD"

    def compute_update(self, i: int, rate: float) -> None:
        grad, history = self.infos[i].param.grad, self.history[i]
        history.mul_(_scalar(self.param.momentum)).add_(grad, alpha=self.local_rate(i, rate))
        grad.copy_(history)

    def compute_updates(self, grads, rate: float) -> None:
        if not grads:
            return
        history = self.history[: len(grads)]
        torch._foreach_mul_(history, _scalar(self.param.momentum))
        for local_rate, blobs in self.rate_groups(rate):
            torch._foreach_add_([history[i] for i in blobs], [grads[i] for i in blobs],
                                alpha=local_rate)  # fmt: skip
        torch._foreach_copy_(grads, history)


class Nesterov(UpdateRule):
    """V_new = momentum*V + local_rate*g; update = (1+momentum)*V_new - momentum*V."""

    type_name = "Nesterov"

    def compute_update(self, i: int, rate: float) -> None:
        grad, history = self.infos[i].param.grad, self.history[i]
        momentum = _scalar(self.param.momentum)
        previous = self.scratch("update", i)
        previous.copy_(history)
        history.mul_(momentum).add_(grad, alpha=self.local_rate(i, rate))
        previous.mul_(-momentum).add_(history, alpha=float(f32(1) + f32(momentum)))
        grad.copy_(previous)

    def compute_updates(self, grads, rate: float) -> None:
        if not grads:
            return
        history = self.history[: len(grads)]
        momentum = _scalar(self.param.momentum)
        previous = [self.scratch("update", i) for i in range(len(grads))]
        torch._foreach_copy_(previous, history)
        torch._foreach_mul_(history, momentum)
        for local_rate, blobs in self.rate_groups(rate):
            torch._foreach_add_([history[i] for i in blobs], [grads[i] for i in blobs],
                                alpha=local_rate)  # fmt: skip
        torch._foreach_mul_(previous, -momentum)
        torch._foreach_add_(previous, history, alpha=float(f32(1) + f32(momentum)))
        torch._foreach_copy_(grads, previous)


def require_no_momentum(param, name: str) -> None:
    if param.momentum != 0:
        raise CaffeAlexError(f"momentum ({param.momentum}) cannot be used with {name}")
