"""BatchNorm: Caffe's normalisation-only batch norm (a Scale layer usually follows it).

Honours ``batch_norm_param``: ``use_global_stats``, ``moving_average_fraction``, ``eps``.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


@register("BatchNorm")
class BatchNormLayer(CaffeLayer):
    """Blobs ``[mean * s, variance * s, s]`` (shapes [C], [C], [1]); none is learnable.

    Caffe stores sums decayed by ``moving_average_fraction`` plus their weight ``s`` instead of
    running averages, so the statistics used with global stats are ``blob / s`` (``s == 0``
    means zero mean and zero variance). In batch mode the biased variance normalises while
    ``m / (m - 1)`` times it is accumulated, ``m`` being the number of values per channel.
    """

    params = {"batch_norm_param": None}
    output_needed_by_backward = False  # a following ReLU may work in place
    can_overwrite_bottom = True  # where no gradient is recorded (inference): see forward

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.batch_norm_param
        self.use_global_stats = phase == "TEST"
        if param.HasField("use_global_stats"):
            self.use_global_stats = param.use_global_stats
        self.fraction = float(param.moving_average_fraction)
        self.eps = float(param.eps)
        # Caffe masks the statistics from the solver with lr_mult 0 and refuses anything else.
        for index, spec in enumerate(layer_param.param[:3]):
            if spec.lr_mult != 0:
                raise LayerConfigError(
                    f"param {index} has lr_mult {spec.lr_mult:g}: BatchNorm statistics cannot be "
                    "learned (give lr_mult: 0 or no param spec)"
                )
        shape = bottom_shapes[0]
        self.channels = 1 if len(shape) == 1 else shape[1]
        for size in (self.channels, self.channels, 1):
            self.new_blob((size,), requires_grad=False)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) > 1 and shape[1] != self.channels:
            raise LayerConfigError(
                f"bottom has {shape[1]} channels (shape {list(shape)}), "
                f"but the layer was set up for {self.channels}"
            )
        return [shape]

    def forward(self, x):
        view = [1] * x.dim()
        view[min(1, x.dim() - 1)] = self.channels
        if self.use_global_stats:
            mean, var = self._global_stats()
            mean, var = mean.view(view), var.view(view)
        else:
            if x.dtype in (torch.float16, torch.bfloat16):
                x = x.float()  # batch statistics of half-precision values are too coarse
            dims = [d for d in range(x.dim()) if d != 1]
            var, mean = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
            self._update_stats(mean.detach().view(-1), var.detach().view(-1), x.numel())
        std = torch.sqrt(var + self.eps)
        if self.may_overwrite(x, mean, std):  # the same two operations, without two new blobs
            return x.sub_(mean).div_(std)
        return (x - mean) / std

    def _global_stats(self):
        s = self.blobs[2]
        factor = torch.where(s == 0, torch.zeros_like(s), 1 / s)
        return self.blobs[0] * factor, self.blobs[1] * factor

    @torch.no_grad()
    def _update_stats(self, mean, var, numel: int) -> None:
        m = numel // self.channels
        correction = m / (m - 1) if m > 1 else 1.0
        mean_blob, var_blob, s = self.blobs
        s.mul_(self.fraction).add_(1)
        mean_blob.mul_(self.fraction).add_(mean.to(mean_blob.dtype))
        var_blob.mul_(self.fraction).add_(var.to(var_blob.dtype), alpha=correction)
