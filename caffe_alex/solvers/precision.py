"""The precision policy of a solver's nets: Caffe's float32, or the forward passes under
torch.autocast in bf16 or fp16, fp16 with torch.amp.GradScaler's loss scaling (an iteration
whose scaled gradients overflowed skips its update, and the scale adapts); optionally the
inputs in channels_last memory order. The parameters, gradients and update stay float32.
"""

from __future__ import annotations

import torch

from ..errors import CaffeAlexError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """``name``: "fp32" (or None), "bf16" or "fp16"; ``channels_last``: 4-D inputs in NHWC.
    ``watch(params)`` gives fp16 its loss scaler over the parameters the update changes."""

    def __init__(self, name: str | None, channels_last: bool, device: torch.device):
        if (name or "fp32") not in PRECISIONS:
            raise CaffeAlexError(f"unknown precision '{name}' ({', '.join(PRECISIONS)})")
        self.autocast = PRECISIONS[name or "fp32"]
        self.channels_last = bool(channels_last)
        self.device = device
        self.scaler = self._step = None

    def watch(self, params: list) -> None:
        if self.autocast == torch.float16 and params:
            self.scaler = torch.amp.GradScaler(self.device.type)
            self._step = _UpdateStep(params)

    def run(self, net, batch: dict) -> dict:
        """``net`` on ``batch`` under this policy."""
        if self.channels_last:
            batch = {k: v.contiguous(memory_format=torch.channels_last) if v.dim() == 4 else v
                     for k, v in batch.items()}  # fmt: skip
        if self.autocast is None:
            return net(**batch)
        with torch.autocast(self.device.type, dtype=self.autocast):
            return net(**batch)

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def update(self, apply):
        """``apply()`` (the solver's update) and its result; with fp16, on the unscaled
        gradients, or None when they overflowed and the update was skipped."""
        if self.scaler is None:
            return apply()
        done = []
        self._step.apply = lambda: done.append(apply())
        self.scaler.unscale_(self._step)
        self.scaler.step(self._step)
        self.scaler.update()
        return done[0] if done else None


class _UpdateStep(torch.optim.Optimizer):
    """The solver's update seen as an Optimizer, so that torch.amp.GradScaler can unscale the
    gradients and skip the update of an iteration whose fp16 gradients overflowed."""

    def __init__(self, params):
        super().__init__(params, {})
        self.apply = lambda: None

    def step(self, closure=None):
        self.apply()
