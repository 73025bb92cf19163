"""``BN``: the batch normalisation with built-in scale and shift of two forks, one type name.

caffe-segnet (alexgkendall/caffe-segnet): ``bn_param`` scale_filler, shift_filler, bn_mode.
Blobs scale and shift, [1, C, 1, 1]; no running statistics. LEARN normalises by the batch's
statistics in every phase (var = E[x^2] - E[x]^2, eps 1e-9) and may have two more tops, the
batch mean and variance [1, C, 1, 1]; INFERENCE is ``x * scale + shift`` (SegNet's script folds
the statistics into scale and shift).

yjxiong/caffe and hszhao/PSPNet: ``bn_param`` slope_filler, bias_filler, momentum, eps, frozen,
engine. Blobs slope, bias, running mean, running variance, [1, C, 1, 1] (yjxiong's [1, C] load
too). TRAIN normalises by the batch's (biased) statistics and moves the running ones by
``momentum``; TEST, or ``frozen`` in any phase, uses the running ones. The running statistics
are never learned, nor are slope and bias when frozen (the fork forces their lr_mult to 0).

Which form: the one whose fields bn_param sets; with neither, the blobs embedded in the layer
(2: caffe-segnet, 4: PSPNet), else caffe-segnet when the layer has extra tops, else PSPNet.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register
from .segmentation import legacy_shape

_SEGNET_FIELDS = ("scale_filler", "shift_filler", "bn_mode")
_PSPNET_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen", "engine")
_SEGNET_EPS = 1e-9  # caffe-segnet's fixed var_eps_


def bn_form(layer_param) -> str:
    """``"segnet"`` or ``"pspnet"``, by the rule in the module's docstring."""
    given = {field.name for field, _ in layer_param.bn_param.ListFields()}
    segnet, pspnet = given.intersection(_SEGNET_FIELDS), given.intersection(_PSPNET_FIELDS)
    if segnet and pspnet:
        raise LayerConfigError(
            f"bn_param mixes caffe-segnet's fields ({', '.join(sorted(segnet))}) with "
            f"yjxiong/PSPNet's ({', '.join(sorted(pspnet))}): give one fork's only"
        )
    if segnet or pspnet:
        return "segnet" if segnet else "pspnet"
    if len(layer_param.blobs) in (2, 4):
        return "segnet" if len(layer_param.blobs) == 2 else "pspnet"
    return "segnet" if len(layer_param.top) > 1 else "pspnet"


class _GlobalStatsNorm(torch.autograd.Function):
    """(x - mean) * inv_std with fixed statistics, but the backward of the batch-statistics
    formula: yjxiong/PSPNet's non-frozen BN backpropagates that way in TEST too.
    dx = inv_std * (g - (x_norm * sum(g * x_norm) + sum(g)) / M) per channel, M = N * H * W."""

    @staticmethod
    def forward(ctx, x, mean, inv_std):
        x_norm = (x - mean) * inv_std
        ctx.save_for_backward(x_norm, inv_std)
        return x_norm

    @staticmethod
    def backward(ctx, g):
        x_norm, inv_std = ctx.saved_tensors
        count = g.numel() // g.shape[1]
        dims = (0, 2, 3)
        sums = x_norm * (g * x_norm).sum(dims, keepdim=True) + g.sum(dims, keepdim=True)
        return inv_std * (g - sums / count), None, None


@register("BN")
class BNLayer(CaffeLayer):
    tops = (1, 3)
    params = {"bn_param": None}
    output_needed_by_backward = False  # a following ReLU may work in place

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.bn_param
        self.form = bn_form(layer_param)
        self.channels = legacy_shape(bottom_shapes[0])[1]
        shape = (1, self.channels, 1, 1)
        self.n_top = len(layer_param.top)
        if self.form == "segnet":
            self.learn = param.bn_mode == caffe_pb2.BNParameter.LEARN
            if self.n_top > 1 and not self.learn:
                raise LayerConfigError(
                    f"bn_param.bn_mode INFERENCE has one top, got {self.n_top} (only LEARN "
                    "adds the batch mean and variance tops)"
                )
            self.new_blob(shape, param.scale_filler)
            self.new_blob(shape, param.shift_filler)
            return
        if self.n_top > 1:
            raise LayerConfigError(
                f"the yjxiong/PSPNet BN has one top, got {self.n_top} (caffe-segnet's LEARN mode "
                "has three: set bn_param.bn_mode for that form)"
            )
        self.frozen = param.frozen
        self.momentum, self.eps = float(param.momentum), float(param.eps)
        self.new_blob(shape, param.slope_filler, requires_grad=not self.frozen)
        self.new_blob(shape, param.bias_filler, requires_grad=not self.frozen)
        self.new_blob(shape, requires_grad=False)
        variance = caffe_pb2.FillerParameter(type="constant", value=1.0 if self.frozen else 0.0)
        self.new_blob(shape, variance, requires_grad=False)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        legacy = legacy_shape(shape)
        if legacy[1] != self.channels:
            raise LayerConfigError(
                f"bottom has {legacy[1]} channels (shape {list(shape)}), but the layer was set "
                f"up for {self.channels}"
            )
        if self.form == "pspnet":
            return [shape]
        return [legacy] + [(1, self.channels, 1, 1)] * (self.n_top - 1)

    def accepts_blob_shape(self, index, shape) -> bool:
        # yjxiong/caffe's BN blobs are [1, C]; PSPNet's (and ours) [1, C, 1, 1]: same values.
        return self.form == "pspnet" and tuple(shape) == (1, self.channels)

    def blob_count_note(self) -> str:
        if self.form == "pspnet":
            return (
                "this BN was set up in the yjxiong/PSPNet form (4 blobs); set bn_param.bn_mode "
                "for caffe-segnet's form (2 blobs)"
            )
        return (
            "this BN was set up in caffe-segnet's form (2 blobs); leave out bn_param's "
            "scale_filler, shift_filler and bn_mode for the yjxiong/PSPNet form (4 blobs)"
        )

    def forward(self, x):
        x4 = x.reshape(legacy_shape(x.shape))
        if self.form == "segnet":
            return self._segnet(x4)
        return self._pspnet(x4).reshape(x.shape)

    def _segnet(self, x):
        scale, shift = self.blobs
        if not self.learn:
            return (x * scale + shift).to(x.dtype)
        low = x.dtype in (torch.float16, torch.bfloat16)
        work = x.float() if low else x  # batch statistics of half-precision values are too coarse
        mean = work.mean((2, 3), keepdim=True).mean(0, keepdim=True)  # spatial, then batch
        square = (work * work).mean((2, 3), keepdim=True).mean(0, keepdim=True)
        var = square - mean * mean
        y = (work - mean) / torch.sqrt(var + _SEGNET_EPS) * scale + shift
        y = y.to(x.dtype)
        if self.n_top == 1:
            return y
        # The fork computes these tops but never backpropagates into them.
        return (y, mean.detach().to(x.dtype), var.detach().to(x.dtype))[: self.n_top]

    def _pspnet(self, x):
        slope, bias, running_mean, running_var = self.blobs
        if self.frozen or self.phase != "TRAIN":
            inv_std = torch.pow(running_var + self.eps, -0.5)
            if self.frozen:  # fixed statistics, true gradient: dy * slope * inv_std
                x_norm = (x - running_mean) * inv_std
            else:
                x_norm = _GlobalStatsNorm.apply(x, running_mean.detach(), inv_std.detach())
            return (x_norm * slope + bias).to(x.dtype)
        low = x.dtype in (torch.float16, torch.bfloat16)
        work = x.float() if low else x
        mean = work.mean((2, 3), keepdim=True).mean(0, keepdim=True)
        centered = work - mean
        var = (centered * centered).mean((2, 3), keepdim=True).mean(0, keepdim=True)
        with torch.no_grad():
            keep = self.momentum
            running_mean.mul_(keep).add_(mean.detach().to(running_mean.dtype), alpha=1 - keep)
            running_var.mul_(keep).add_(var.detach().to(running_var.dtype), alpha=1 - keep)
        x_norm = centered * torch.pow(var + self.eps, -0.5)
        return (x_norm * slope + bias).to(x.dtype)
