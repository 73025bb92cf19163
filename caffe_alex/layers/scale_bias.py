"""Scale and Bias: multiply or add a blob broadcast over ``bottom[0]`` from ``axis`` on.

Scale honours ``scale_param``: ``axis``, ``num_axes``, ``filler``, ``bias_term``,
``bias_filler``. Bias honours ``bias_param``: ``axis``, ``num_axes``, ``filler``.
The operand is a learned blob (one bottom) or ``bottom[1]`` (two bottoms).
"""

from __future__ import annotations

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, canonical_axis, register


def operand_shape(bottom_shape, axis: int, num_axes: int) -> tuple[int, ...]:
    """Shape of a learned operand: ``bottom_shape[axis : axis + num_axes]`` (-1 = to the end)."""
    axis = canonical_axis(axis, len(bottom_shape))
    if num_axes < -1:
        raise LayerConfigError(f"num_axes must be >= 0, or -1 for all remaining; got {num_axes}")
    if num_axes >= 0 and axis + num_axes > len(bottom_shape):
        raise LayerConfigError(
            f"axis {axis} + num_axes {num_axes} extends past the {len(bottom_shape)}-D bottom "
            f"{list(bottom_shape)}"
        )
    end = len(bottom_shape) if num_axes == -1 else axis + num_axes
    return tuple(bottom_shape[axis:end])


def broadcast_axis(bottom_shape, operand, axis: int) -> int:
    """Caffe's Reshape check: ``operand`` must equal the bottom's dims from ``axis`` on."""
    if len(operand) == 0:
        return 0  # a scalar applies everywhere; Caffe then ignores axis
    axis = canonical_axis(axis, len(bottom_shape))
    if tuple(bottom_shape[axis : axis + len(operand)]) != tuple(operand):
        raise LayerConfigError(
            f"operand shape {list(operand)} does not match bottom[0] shape {list(bottom_shape)} "
            f"from axis {axis}"
        )
    return axis


def apply_shape(ndim: int, operand, axis: int) -> list[int]:
    """The view that broadcasts ``operand`` (placed at ``axis``) against an ``ndim``-D bottom."""
    return [1] * axis + list(operand) + [1] * (ndim - axis - len(operand))


class _BroadcastLayer(CaffeLayer):
    bottoms = (1, 2)
    output_needed_by_backward = False  # a following ReLU may work in place

    def _operand(self, bottoms):
        """The (x, operand) pair, the operand shaped to broadcast against x."""
        x = bottoms[0]
        operand = bottoms[1] if len(bottoms) > 1 else self.blobs[0]
        axis = broadcast_axis(x.shape, operand.shape, self.axis)
        return x, operand.reshape(apply_shape(x.dim(), operand.shape, axis))

    def _check(self, bottom_shapes, learned):
        operand = bottom_shapes[1] if len(bottom_shapes) > 1 else learned.shape
        broadcast_axis(bottom_shapes[0], operand, self.axis)
        return [tuple(bottom_shapes[0])]


@register("Bias")
class BiasLayer(_BroadcastLayer):
    """``top = bottom[0] + bias`` (filler default constant 0)."""

    params = {"bias_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.bias_param
        self.axis = param.axis
        if len(bottom_shapes) == 1:
            shape = operand_shape(bottom_shapes[0], param.axis, param.num_axes)
            self.new_blob(shape, param.filler)

    def top_shapes(self, bottom_shapes):
        return self._check(bottom_shapes, self.blobs[0] if len(self.blobs) else None)

    def forward(self, *bottoms):
        x, bias = self._operand(bottoms)
        return x + bias


@register("Scale")
class ScaleLayer(_BroadcastLayer):
    """``top = bottom[0] * scale (+ bias)``; the scale filler defaults to constant 1.

    With two bottoms and ``bias_term`` the bias is the only blob; it spans the scale's axes.
    """

    params = {"scale_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.scale_param
        self.axis = param.axis
        self.bias_term = param.bias_term
        if len(bottom_shapes) == 1:
            shape = operand_shape(bottom_shapes[0], param.axis, param.num_axes)
            filler = param.filler if param.HasField("filler") else _constant(1.0)
            self.new_blob(shape, filler)
            bias_axes = param.num_axes
        else:
            bias_axes = len(bottom_shapes[1])
        if self.bias_term:
            shape = operand_shape(bottom_shapes[0], param.axis, bias_axes)
            self.new_blob(shape, param.bias_filler)
        self.two_bottoms = len(bottom_shapes) == 2

    def top_shapes(self, bottom_shapes):
        learned = None if self.two_bottoms else self.blobs[0]
        shapes = self._check(bottom_shapes, learned)
        if self.bias_term:
            broadcast_axis(bottom_shapes[0], self.blobs[-1].shape, self.axis)
        return shapes

    can_overwrite_bottom = True  # where no gradient is recorded (inference): see forward

    def forward(self, *bottoms):
        x, scale = self._operand(bottoms)
        bias = None
        if self.bias_term:
            bias = self.blobs[-1]
            axis = broadcast_axis(x.shape, bias.shape, self.axis)
            bias = bias.reshape(apply_shape(x.dim(), bias.shape, axis))
        operands = (scale,) if bias is None else (scale, bias)
        # (the operands broadcast to x's shape: _operand shapes them from x's axes)
        if self.may_overwrite(x, *operands):  # the same operations, without new blobs
            out = x.mul_(scale)
            return out if bias is None else out.add_(bias)
        out = x * scale
        return out if bias is None else out + bias


def _constant(value: float) -> caffe_pb2.FillerParameter:
    return caffe_pb2.FillerParameter(type="constant", value=value)
