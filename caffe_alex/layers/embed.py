"""Parameter (parameter_param) and Embed (embed_param): layers whose output is a learned table.

Parameter: no bottom; its one top *is* its one learnable blob, of ``parameter_param.shape``
(Caffe shares the blob's data and diff with the top), so a net can learn a free tensor. Caffe
gives it no filler: the blob starts as freshly allocated Caffe memory, which is zeroed.

Embed: a lookup table. Blobs: weight (input_dim x num_output, InnerProduct's layout transposed)
from weight_filler, and with ``bias_term`` (default true) a bias (num_output) from bias_filler.
The bottom holds indices stored as floats; top shape = bottom shape + (num_output,). Each index
must be an integer in [0, input_dim): Caffe states this with debug-only checks; here a bad value
raises CaffeAlexError at forward. Backward accumulates into the weight rows (repeated indices
add up) and refuses a gradient for the indices, as Caffe does.
"""

from __future__ import annotations

import math

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, register, tracing
from .indexing import GatherRows, first_bad


@register("Parameter")
class ParameterLayer(CaffeLayer):
    """top = the layer's blob (zeros until trained or loaded)."""

    bottoms = (0, 0)
    params = {"parameter_param": frozenset({"shape"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.shape = tuple(int(d) for d in layer_param.parameter_param.shape.dim)
        self.new_blob(self.shape)  # zeros; refused (with the shape) past Caffe's blob limits

    def top_shapes(self, bottom_shapes):
        return [self.shape]

    def forward(self):
        blob = self.blobs[0]
        return blob.view_as(blob)  # the top shares the blob's memory, as in Caffe


@register("Embed")
class EmbedLayer(CaffeLayer):
    """top[..., :] = weight[index] (+ bias)."""

    params = {
        "embed_param": frozenset(
            {"num_output", "input_dim", "bias_term", "weight_filler", "bias_filler"}
        )
    }

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        ep = layer_param.embed_param
        if ep.num_output <= 0:
            raise LayerConfigError("embed_param.num_output must be positive")
        if ep.input_dim <= 0:
            raise LayerConfigError("embed_param.input_dim must be positive")
        self.num_output, self.input_dim, self.bias_term = ep.num_output, ep.input_dim, ep.bias_term
        self.new_blob((self.input_dim, self.num_output), ep.weight_filler)
        if self.bias_term:
            self.new_blob((self.num_output,), ep.bias_filler)
        self.refusal = (
            "cannot backpropagate to the input (the indices)",
            self.name,
            self.type_name,
        )

    def top_shapes(self, bottom_shapes):
        return [(*bottom_shapes[0], self.num_output)]

    def _check(self, x) -> None:
        k = self.input_dim
        whole = x == x.trunc() if x.is_floating_point() else torch.ones_like(x, dtype=torch.bool)
        bad = first_bad(~((x >= 0) & (x < k) & whole), x)
        if bad is None:
            return
        position, value = bad
        integral = math.isfinite(value) and value.is_integer()
        what = "is out of range" if integral or math.isinf(value) else "is not an integer"
        raise CaffeAlexError(
            f"input value {value:g} (position {position}) {what}: indices must be integers in "
            f"[0, {k}) (embed_param.input_dim {k})",
            layer=self.name,
            layer_type=self.type_name,
        )

    def forward(self, x):
        if not tracing():
            self._check(x)
        y = GatherRows.apply(self.blobs[0], x, x.long(), self.refusal)
        return y + self.blobs[1] if self.bias_term else y

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_output={self.num_output}, input_dim={self.input_dim}, "
            f"bias_term={self.bias_term}"
        )
