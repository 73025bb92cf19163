"""Element-wise activations: ReLU, PReLU, ELU, Sigmoid, TanH, AbsVal, BNLL, Swish.

Honours ``relu_param.negative_slope``, ``prelu_param`` (``filler``, ``channel_shared``),
``elu_param.alpha`` and ``swish_param.beta``; Sigmoid and TanH have only ``engine``, BNLL no
parameter. None of them writes into its bottom, so Caffe's in-place use (top named like the
bottom) is safe for autograd, except ReLU, which overwrites its bottom where the builder finds
that safe (see ``CaffeLayer.in_place``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register


@register("ReLU")
class ReLULayer(CaffeLayer):
    """max(x, 0) + negative_slope * min(x, 0). Caffe's gradient at exactly 0 is negative_slope;
    torch's relu / leaky_relu backward tests ``x > 0`` as Caffe does, so autograd matches."""

    params = {"relu_param": frozenset({"negative_slope"})}
    can_overwrite_bottom = True

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.negative_slope = float(layer_param.relu_param.negative_slope)

    def forward(self, x):
        # in place as Caffe when the builder allows it (never on a leaf that wants a gradient)
        overwrite = self.in_place and not (x.is_leaf and x.requires_grad)
        if self.negative_slope == 0.0:
            return torch.relu_(x) if overwrite else torch.relu(x)
        return F.leaky_relu(x, self.negative_slope, inplace=overwrite)


@register("PReLU")
class PReLULayer(CaffeLayer):
    """ReLU with a learnt slope per channel (axis 1), or one shared slope whose blob has zero
    axes (``channel_shared``). Default filler: constant 0.25."""

    params = {"prelu_param": frozenset({"filler", "channel_shared"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.prelu_param
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise LayerConfigError(f"PReLU needs a bottom with at least 2 axes, got {list(shape)}")
        self.channel_shared = bool(param.channel_shared)
        blob_shape = () if self.channel_shared else (shape[1],)
        filler = param.filler if param.HasField("filler") else _constant_filler(0.25)
        self.new_blob(blob_shape, filler)

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise LayerConfigError(f"PReLU needs a bottom with at least 2 axes, got {list(shape)}")
        if not self.channel_shared and shape[1] != self.blobs[0].numel():
            raise LayerConfigError(
                f"PReLU has {self.blobs[0].numel()} slopes but the bottom has {shape[1]} channels"
            )
        return [shape]

    def forward(self, x):
        # Caffe's gradients (slope at x <= 0; slope diff x * dy summed over x <= 0) are torch's.
        return F.prelu(x, self.blobs[0].reshape(-1).to(x.dtype))


def _constant_filler(value: float):
    return caffe_pb2.FillerParameter(type="constant", value=value)


class _CaffeELU(torch.autograd.Function):
    """Caffe's ELU: forward max(x,0) + alpha*(exp(min(x,0)) - 1) in the input's precision,
    backward dy * (y + alpha) wherever x <= 0 (so alpha at exactly 0, and 0 once y + alpha
    rounds to 0 for very negative x, where torch's alpha*exp(x) would not)."""

    @staticmethod
    def forward(ctx, x, alpha: float):
        y = x.clamp(max=0).exp_().sub_(1).mul_(alpha).add_(x.clamp(min=0))
        ctx.save_for_backward(x, y)
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y = ctx.saved_tensors
        return torch.where(x > 0, dy, dy * (y + ctx.alpha)), None


@register("ELU")
class ELULayer(CaffeLayer):
    """Exponential linear unit (``elu_param.alpha``) with Caffe's backward."""

    params = {"elu_param": frozenset({"alpha"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.alpha = float(layer_param.elu_param.alpha)

    def forward(self, x):
        return _CaffeELU.apply(x, self.alpha)


@register("Sigmoid")
class SigmoidLayer(CaffeLayer):
    """Caffe writes 0.5*tanh(0.5x) + 0.5 with double literals, so it is evaluated in double and
    rounded once to float: torch.sigmoid gives that float, except that Caffe's cancellation in
    double flushes values below ~1e-17 (x < -37) to 0; a float32 tanh form would be off by up
    to 3e-8 for negative x. Backward dy*y*(1-y) from the output, as torch's."""

    params = {"sigmoid_param": frozenset()}

    def forward(self, x):
        return torch.sigmoid(x)


@register("TanH")
class TanHLayer(CaffeLayer):
    """tanh; backward dy*(1 - y^2) from the output, as Caffe's."""

    params = {"tanh_param": frozenset()}

    def forward(self, x):
        return torch.tanh(x)


@register("AbsVal")
class AbsValLayer(CaffeLayer):
    """|x|; the gradient is sign(x) * dy, 0 at x == 0. Caffe refuses in-place use."""

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        if layer_param.top and layer_param.bottom and layer_param.top[0] == layer_param.bottom[0]:
            raise LayerConfigError("AbsVal does not allow in-place computation (top == bottom)")

    def forward(self, x):
        return torch.abs(x)


_BNLL_THRESHOLD = 50.0  # Caffe's kBNLL_THRESHOLD


class _CaffeBNLL(torch.autograd.Function):
    """Caffe's softplus. Forward: exp(-|x|) in the input's precision, then max(x, 0) +
    log(1. + e) in double (a double literal), rounded once; log(1 + e) rather than log1p, so
    y is exactly 0 for x below about -37. Backward: ev = exp(min(x, 50)) in the input's
    precision (the clamp keeps ev/(ev+1) finite), dy*ev rounded to it, then divided in double
    by ev + 1."""

    @staticmethod
    def forward(ctx, x):
        e = torch.exp(-x.abs()).double()
        y = torch.log(e.add_(1.0)).add_(x.clamp(min=0).double())
        ctx.save_for_backward(x)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        ev = torch.exp(x.clamp(max=_BNLL_THRESHOLD))
        grad = (dy * ev).double().div_(ev.double().add_(1.0))
        return grad.to(x.dtype)


@register("BNLL")
class BNLLLayer(CaffeLayer):
    """Binomial normal log likelihood, y = log(1 + exp(x)), in Caffe's overflow-safe form."""

    output_needed_by_backward = False

    def forward(self, x):
        return _CaffeBNLL.apply(x)


def _caffe_sigmoid(x):
    # Caffe's sigmoid is 0.5*tanh(0.5x) + 0.5 with double literals: evaluated in double,
    # rounded once (values below about 3e-17 cancel to exactly 0).
    return torch.tanh(x.double() * 0.5).mul_(0.5).add_(0.5).to(x.dtype)


class _CaffeSwish(torch.autograd.Function):
    """y = x * s, s = sigmoid(beta*x) (beta*x rounded to the input's precision first).
    Backward from the saved top and sigmoid, as Caffe's CPU code: a = beta*y in the input's
    precision, then dy * (a + s*(1. - a)) in double (a double literal), rounded once. (Caffe's
    GPU kernel writes an integer 1 and stays in float; the two differ by an ulp at most.)"""

    @staticmethod
    def forward(ctx, x, beta: float):
        s = _caffe_sigmoid(x * beta if beta != 1.0 else x)
        y = x * s
        ctx.save_for_backward(y, s)
        ctx.beta = beta
        return y

    @staticmethod
    def backward(ctx, dy):
        y, s = ctx.saved_tensors
        a = (y * ctx.beta).double()
        grad = a.neg().add_(1.0).mul_(s.double()).add_(a).mul_(dy.double())
        return grad.to(dy.dtype), None


@register("Swish")
class SwishLayer(CaffeLayer):
    """x * sigmoid(beta * x) (``swish_param.beta``, default 1) with Caffe's backward."""

    params = {"swish_param": frozenset({"beta"})}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        self.beta = float(layer_param.swish_param.beta)

    def forward(self, x):
        return _CaffeSwish.apply(x, self.beta)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, beta={self.beta}"
