"""Dropout: in TRAIN keep each element with probability 1 - p and scale it by 1/(1 - p);
identity in TEST.

Honours ``dropout_param.dropout_ratio``, caffe-segnet's ``sample_weights_test`` (Bayesian
SegNet: drop in every phase, so repeated TEST passes sample the net) and caffe-fast-rcnn's
``scale_train`` (default true): false leaves the kept values unscaled in TRAIN and multiplies
by 1 - p in TEST instead, as the MSRA-trained ZF nets of Faster R-CNN expect.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


@register("Dropout")
class DropoutLayer(CaffeLayer):
    """Caffe's inverted dropout. The mask is drawn with torch's RNG on the input's device, so it
    follows ``torch.manual_seed`` (not Caffe's random stream). A TRAIN-phase net put in
    ``eval()`` mode also passes its input through, as ``nn.Dropout`` would (times 1 - p when
    ``scale_train`` is false: a TEST pass)."""

    params = {"dropout_param": frozenset({"dropout_ratio", "sample_weights_test", "scale_train"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        ratio = float(layer_param.dropout_param.dropout_ratio)
        # Caffe only checks 0 < p < 1 in debug builds; p = 0 is harmless, p = 1 would give NaN.
        if not 0.0 <= ratio < 1.0:
            raise LayerConfigError(f"dropout_param.dropout_ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio
        self.scale_train = bool(layer_param.dropout_param.scale_train)
        # Caffe computes 1/(1-p) in double and stores it as the blob type (float).
        self.scale = 1.0 / (1.0 - ratio)
        self.sample_test = layer_param.dropout_param.sample_weights_test
        # caffe-fast-rcnn's TEST factor: 1 / scale_ in double, passed to caffe_scal as a float
        stored = float(torch.tensor(self.scale, dtype=torch.float32))
        self.test_factor = float(torch.tensor(1.0 / stored, dtype=torch.float32))

    def forward(self, x):
        sampling = self.sample_test or (self.phase == "TRAIN" and self.training)
        if not sampling:
            return x if self.scale_train else x * self.test_factor
        keep = torch.empty_like(x).bernoulli_(1.0 - self.ratio)
        return x * (keep.mul_(self.scale) if self.scale_train else keep)

    def extra_repr(self) -> str:
        scale_train = "" if self.scale_train else ", scale_train=False"
        return (
            f"{super().extra_repr()}, dropout_ratio={self.ratio}{scale_train}, phase={self.phase}"
        )
