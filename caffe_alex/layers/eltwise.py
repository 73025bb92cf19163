"""Eltwise: element-wise SUM, PROD or MAX of equally shaped bottoms.

Honours ``eltwise_param``: ``operation``, ``coeff``, ``stable_prod_grad``.
"""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register

_Op = caffe_pb2.EltwiseParameter


@register("Eltwise")
class EltwiseLayer(CaffeLayer):
    """SUM (with one ``coeff`` per bottom), PROD or MAX of equally shaped bottoms.

    MAX follows Caffe's scan: bottom 0 wins over bottom 1 only when strictly greater, each later
    bottom only when strictly greater than the running maximum; ``torch.where`` sends the
    gradient to exactly that winner. ``stable_prod_grad`` only changes how Caffe evaluates the
    PROD gradient; autograd's product rule is the stable form either way.
    """

    bottoms = (2, None)
    params = {"eltwise_param": None}
    output_needed_by_backward = False  # a following ReLU may work in place

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.eltwise_param
        self.op = param.operation
        coeffs = list(param.coeff)
        if coeffs and len(coeffs) != len(bottom_shapes):
            raise LayerConfigError(
                f"eltwise_param has {len(coeffs)} coeff values for {len(bottom_shapes)} bottoms; "
                "give one per bottom"
            )
        if coeffs and self.op == _Op.PROD:
            raise LayerConfigError("eltwise_param.coeff is only allowed with operation SUM")
        self.coeffs = coeffs or [1.0] * len(bottom_shapes)

    def top_shapes(self, bottom_shapes):
        first = tuple(bottom_shapes[0])
        for index, shape in enumerate(bottom_shapes[1:], start=1):
            if tuple(shape) != first:
                raise LayerConfigError(
                    f"all bottoms must have the same shape: bottom 0 is {list(first)}, "
                    f"bottom {index} is {list(shape)}"
                )
        return [first]

    def forward(self, *bottoms):
        if self.op == _Op.PROD:
            out = bottoms[0] * bottoms[1]
            for b in bottoms[2:]:
                out = out * b
            return out
        if self.op == _Op.SUM:
            out = bottoms[0] * self.coeffs[0] if self.coeffs[0] != 1 else bottoms[0]
            for c, b in zip(self.coeffs[1:], bottoms[1:], strict=True):
                out = out + (b * c if c != 1 else b)
            return out
        out = torch.where(bottoms[0] > bottoms[1], bottoms[0], bottoms[1])
        for b in bottoms[2:]:
            out = torch.where(b > out, b, out)
        return out
