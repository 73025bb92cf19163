"""InnerProduct (inner_product_param): a fully connected layer over the axes from ``axis`` on.

Honoured fields: num_output, bias_term, weight_filler, bias_filler, axis, transpose. The weight
blob is num_output x K, or K x num_output with ``transpose``; K = count of the bottom from
``axis`` on, fixed when the layer is set up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, compiling, count, exporting, register

# Multiply-adds up to which a compiled graph computes the product as its own loops (fused with
# what surrounds it) rather than calling BLAS: on a 2-core Xeon, a tiny product's forward and
# backward compiled take ~30% less time that way up to ~65,000, ~40% more from ~130,000.
FUSED_PRODUCT_LIMIT = 32_768


@register("InnerProduct")
class InnerProductLayer(CaffeLayer):
    """top = bottom (flattened to M x K) times the weight, plus the bias; shape[:axis] + (N,)."""

    params = {
        "inner_product_param": frozenset(
            {"num_output", "bias_term", "weight_filler", "bias_filler", "axis", "transpose"}
        )
    }
    output_needed_by_backward = False  # a following ReLU may work in place

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        ip = layer_param.inner_product_param
        self.axis_param = ip.axis
        self.num_output, self.transpose = ip.num_output, ip.transpose
        if self.num_output <= 0:
            raise LayerConfigError("inner_product_param.num_output must be positive")
        shape = bottom_shapes[0]
        self.k = count(shape, self._axis(shape))
        weight_shape = (self.k, self.num_output) if self.transpose else (self.num_output, self.k)
        self.new_blob(weight_shape, ip.weight_filler)
        self.bias_term = ip.bias_term
        if self.bias_term:
            self.new_blob((self.num_output,), ip.bias_filler)

    def _axis(self, shape) -> int:
        return canonical_axis(self.axis_param, len(shape), "inner_product_param.axis")

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        axis = self._axis(shape)
        k = count(shape, axis)
        if k != self.k:
            raise LayerConfigError(
                f"bottom shape {list(shape)} gives {k} inputs per output from axis {axis}, but "
                f"the weights were set up for {self.k}"
            )
        return [(*shape[:axis], self.num_output)]

    def forward(self, x):
        axis = self._axis(x.shape)
        weight = self.blobs[0].t() if self.transpose else self.blobs[0]
        bias = self.blobs[1] if self.bias_term else None
        flat = x.flatten(axis)
        if _fused_when_compiled(flat, weight, bias):
            out = (flat.unsqueeze(-2) * weight).sum(-1)
            return out if bias is None else out + bias
        return F.linear(flat, weight, bias)


def _fused_when_compiled(flat, weight, bias) -> bool:
    """Whether torch.compile traces a product small enough to compute as a sum of products
    (inductor fuses it with the ops around it, forward and backward, where ``linear`` is a call
    into BLAS costing microseconds before any arithmetic: a tiny net's captured step is a few
    such calls). On the CPU only, and never for torch.export (an exported graph keeps its
    matrix products: ONNX's Gemm, the source export's linear)."""
    if not compiling() or exporting() or flat.device.type != "cpu":
        return False
    # float32/64 alike only: a half product would round each term (a backend that does not
    # widen them as inductor does gives inf - inf), autocast's is bf16/fp16 like the eager
    # layer's, and linear refuses mixed dtypes
    if flat.dtype not in _SUMMED or not flat.dtype == weight.dtype == (
            flat.dtype if bias is None else bias.dtype) or _cpu_autocast():  # fmt: skip
        return False
    return flat.numel() * weight.shape[0] <= FUSED_PRODUCT_LIMIT


_SUMMED = (torch.float32, torch.float64)


def _cpu_autocast_probe():
    try:
        torch.is_autocast_enabled("cpu")  # (torch >= 2.4; before, no device argument)
        return lambda: torch.is_autocast_enabled("cpu")
    except TypeError:
        return torch.is_autocast_cpu_enabled


_cpu_autocast = _cpu_autocast_probe()
