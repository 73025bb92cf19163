"""Pooling (pooling_param) with Caffe's output sizes, AVE divisors and MAX tie rule.

Honoured fields: pool (MAX, AVE, STOCHASTIC), kernel_size or kernel_h/kernel_w, stride or
stride_h/stride_w, pad or pad_h/pad_w, global_pooling, round_mode (CEIL, FLOOR), and the forks'
ceil_mode (caffe-fast-rcnn, DenseNet and SSD ports: true rounds up as CEIL, false down as FLOOR,
with the same padding correction). MAX may have a second top: the argmax as a float flat index
h * W + w into the unpadded bottom.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import LayerConfigError
from ..proto import caffe_pb2
from ..registry import CaffeLayer, register, tracing

_P = caffe_pb2.PoolingParameter
_FLT_MAX = 3.4028234663852886e38  # Caffe starts every MAX window at -FLT_MAX


def _pair(pp, name: str, default: int) -> tuple[int, int]:
    """``name`` for both axes, or ``name_h`` and ``name_w`` (kernel_size pairs with kernel_h/w)."""
    field = "kernel_size" if name == "kernel" else name
    if pp.HasField(f"{name}_h") or pp.HasField(f"{name}_w"):
        if pp.HasField(field) or not (pp.HasField(f"{name}_h") and pp.HasField(f"{name}_w")):
            raise LayerConfigError(f"give either {field} or both {name}_h and {name}_w")
        return getattr(pp, f"{name}_h"), getattr(pp, f"{name}_w")
    value = getattr(pp, field) if pp.HasField(field) else default
    return value, value


_NHWC = torch.channels_last


def _nhwc_pays(x: torch.Tensor) -> bool:
    """PyTorch's CPU max pooling of an NCHW tensor is a scalar loop per plane, its NHWC kernel
    vectorised over the channels: 3-4x faster on AlexNet's pool1 (batch 32: 43 -> 10 ms) even
    with the two copies. Not worth it for one channel, and not where a graph is traced."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] > 1
            and x.is_contiguous() and not tracing())  # fmt: skip


class _MaxPoolInNHWC(torch.autograd.Function):
    """F.max_pool2d of an NCHW bottom run in NHWC order, the top back in NCHW: the same maxima
    and the same first-maximum indices (tested bit for bit). The backward scatters through
    those indices in NCHW, as PyTorch's own max pooling does."""

    @staticmethod
    def forward(ctx, x, kernel, stride, pad, ceil: bool):
        top, indices = F.max_pool2d(x.contiguous(memory_format=_NHWC), kernel, stride, pad, 1,
                                    ceil, True)  # fmt: skip
        indices = indices.contiguous()
        ctx.save_for_backward(x, indices)
        ctx.geometry = (kernel, stride, pad, ceil)
        return top.contiguous()

    @staticmethod
    def backward(ctx, top_diff):
        x, indices = ctx.saved_tensors
        kernel, stride, pad, ceil = ctx.geometry
        bottom_diff = torch.ops.aten.max_pool2d_with_indices_backward(
            top_diff.contiguous(), x, list(kernel), list(stride), list(pad), [1, 1], ceil, indices
        )
        return bottom_diff, None, None, None, None


def caffe_pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool) -> int:
    """Caffe's rule: round up (CEIL) or down, then drop a last window starting in the padding."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
        out -= 1
    return out


def _mask_dtype(y):  # float32 at least: bf16 could not hold indices above 256 exactly
    return torch.promote_types(y.dtype, torch.float32)


@register("Pooling")
class PoolingLayer(CaffeLayer):
    """2-D pooling of an N x C x H x W bottom (Caffe engine semantics)."""

    tops = (1, 2)
    params = {"pooling_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        pp = layer_param.pooling_param
        self.method = _P.PoolMethod.Name(pp.pool)
        self.global_pooling = pp.global_pooling
        if self.global_pooling:
            if pp.HasField("kernel_size") or pp.HasField("kernel_h") or pp.HasField("kernel_w"):
                raise LayerConfigError(
                    "global_pooling takes the kernel from the bottom: "
                    "do not give kernel_size or kernel_h/kernel_w"
                )
        elif pp.HasField("kernel_size") == (pp.HasField("kernel_h") and pp.HasField("kernel_w")):
            raise LayerConfigError("give kernel_size or both kernel_h and kernel_w (not both)")
        self.kernel = _pair(pp, "kernel", 0)
        self.stride, self.pad = _pair(pp, "stride", 1), _pair(pp, "pad", 0)
        self.ceil = self._rounds_up(pp)
        self.n_top = len(layer_param.top)
        self._check(pp)

    @staticmethod
    def _rounds_up(pp) -> bool:
        # The forks' ceil_mode reuses round_mode's field number with the opposite sense, so a
        # file giving both was written for two different Caffes: refuse it rather than guess.
        if pp.HasField("ceil_mode") and pp.HasField("round_mode"):
            raise LayerConfigError(
                f"pooling_param sets both round_mode ({_P.RoundMode.Name(pp.round_mode)}) and "
                f"the forks' ceil_mode ({str(pp.ceil_mode).lower()}); give only one of them"
            )
        if pp.HasField("ceil_mode"):
            return pp.ceil_mode
        return pp.round_mode == _P.CEIL

    def _check(self, pp) -> None:
        if self.global_pooling and (self.pad != (0, 0) or self.stride != (1, 1)):
            raise LayerConfigError("global_pooling needs pad 0 and stride 1")
        if min(self.stride) <= 0 or (not self.global_pooling and min(self.kernel) <= 0):
            raise LayerConfigError(f"kernel {self.kernel} and stride {self.stride} must be > 0")
        if self.pad != (0, 0) and self.method == "STOCHASTIC":
            raise LayerConfigError("pooling_param.pool STOCHASTIC does not support pad")
        if not self.global_pooling and (
            self.pad[0] >= self.kernel[0] or self.pad[1] >= self.kernel[1]
        ):
            raise LayerConfigError(f"pad {self.pad} must be smaller than kernel {self.kernel}")
        if self.n_top == 2 and self.method != "MAX":
            raise LayerConfigError(f"only MAX pooling has a second (mask) top, not {self.method}")

    def _geometry(self, height: int, width: int):
        """Kernel and pooled size for this bottom (global pooling takes the kernel from it)."""
        kernel = (height, width) if self.global_pooling else self.kernel
        out = tuple(
            caffe_pooled_size(size, k, s, p, self.ceil)
            for size, k, s, p in zip((height, width), kernel, self.stride, self.pad, strict=True)
        )
        return kernel, out

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise LayerConfigError(f"needs a 4-D (N, C, H, W) bottom, got shape {list(shape)}")
        _, out = self._geometry(*shape[2:])
        if min(out) <= 0:
            raise LayerConfigError(f"pooled size {list(out)} is empty for bottom {list(shape)}")
        return [(*shape[:2], *out)] * self.n_top

    def _window_stride(self, size, out) -> tuple[int, ...]:
        """The stride to pool the padded bottom with. A stride of at least size + pad puts every
        window after the first past the image, where Caffe's windows are empty; size + pad
        does the same without padding the bottom to the real stride (up to INT_MAX)."""
        return tuple(
            min(s, n + p) if o > 1 else s
            for n, s, p, o in zip(size, self.stride, self.pad, out, strict=True)
        )

    def _padded(self, x, kernel, out, stride, value: float):
        # Pad (or crop) so that a plain floor-mode pooling gives exactly Caffe's windows.
        pads = []
        for n, k, s, p, o in zip(x.shape[2:], kernel, stride, self.pad, out, strict=True):
            pads = [p, (o - 1) * s + k - n - p, *pads]  # F.pad lists the last axis first
        return F.pad(x, pads, value=value)

    def _native(self, size, kernel, out) -> bool:
        """Whether PyTorch's own padding and rounding give Caffe's windows: PyTorch limits pad to
        half the kernel and also drops a last window starting past the image when pad is 0."""
        return all(
            p <= k // 2 and k <= n + 2 * p and (p or not self.ceil or (o - 1) * s < n)
            for n, k, s, p, o in zip(size, kernel, self.stride, self.pad, out, strict=True)
        )

    def forward(self, x):
        kernel, out = self._geometry(x.shape[2], x.shape[3])
        native = self.method != "STOCHASTIC" and self._native(x.shape[2:], kernel, out)
        if native and self.method == "MAX" and self.n_top == 1:
            if not _nhwc_pays(x):
                return F.max_pool2d(x, kernel, self.stride, self.pad, 1, self.ceil)
            if torch.is_grad_enabled() and x.requires_grad:
                return _MaxPoolInNHWC.apply(x, kernel, self.stride, self.pad, self.ceil)
            nhwc = x.contiguous(memory_format=_NHWC)  # no indices to keep: the maxima only
            return F.max_pool2d(nhwc, kernel, self.stride, self.pad, 1, self.ceil).contiguous()
        if native and self.method == "MAX":
            y, idx = F.max_pool2d(x, kernel, self.stride, self.pad, 1, self.ceil, True)
            # Same first-maximum rule; indices are already h * W + w in the unpadded bottom.
            return y, idx.to(_mask_dtype(y))
        if native:  # its count_include_pad divisor is Caffe's window clipped to [-pad, n + pad)
            return F.avg_pool2d(x, kernel, self.stride, self.pad, self.ceil, True)
        stride = self._window_stride(x.shape[2:], out)
        if self.method == "MAX":
            return self._max(x, kernel, out, stride)
        if self.method == "AVE":
            padded = self._padded(x, kernel, out, stride, 0.0)
            total = F.avg_pool2d(padded, kernel, stride, divisor_override=1)
            return (total / self._divisor(kernel, out, x)).to(x.dtype)
        return self._stochastic(x, kernel, out, stride)

    def _max(self, x, kernel, out, stride):
        low = -_FLT_MAX if x.element_size() >= 4 else torch.finfo(x.dtype).min
        padded = self._padded(x, kernel, out, stride, low)
        # PyTorch's max pooling also keeps the first maximum in scan order, as Caffe does.
        y, idx = F.max_pool2d(padded, kernel, stride, return_indices=True)
        if self.n_top == 1:
            return y
        h = torch.div(idx, padded.shape[3], rounding_mode="floor") - self.pad[0]
        w = idx % padded.shape[3] - self.pad[1]
        inside = (h >= 0) & (h < x.shape[2]) & (w >= 0) & (w < x.shape[3])
        mask = torch.where(inside, h * x.shape[3] + w, torch.full_like(idx, -1))
        return y, mask.to(_mask_dtype(y))

    def _divisor(self, kernel, out, x):
        # Caffe divides by the window clipped to [-pad, size + pad), not to the image. A window
        # that ceil rounding starts past the image (stride > kernel, no pad) gets an area <= 0,
        # so 0 / 0 = NaN there, as in Caffe.
        sizes = []
        for k, s, p, o, n in zip(kernel, self.stride, self.pad, out, x.shape[2:], strict=True):
            start = torch.arange(o, device=x.device) * s - p
            sizes.append(torch.clamp(start + k, max=n + p) - start)
        return (sizes[0][:, None] * sizes[1][None, :]).to(
            torch.promote_types(x.dtype, torch.float32)
        )

    def _stochastic(self, x, kernel, out, stride):
        # Windows of x without padding: (N, C, oh, ow, kh * kw), in Caffe's scan order.
        padded = self._padded(x, kernel, out, stride, 0.0)
        win = padded.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
        win = win.flatten(-2)
        if self.phase != "TRAIN":  # TEST: the average weighted by each value's probability
            return (win * win).sum(-1) / (win.sum(-1) + torch.finfo(torch.float32).tiny)
        # TRAIN: pick the first position whose running sum reaches u * window sum.
        cumsum = win.cumsum(-1)
        threshold = torch.rand(cumsum.shape[:-1], device=x.device, dtype=x.dtype)
        reached = cumsum >= (threshold * cumsum[..., -1])[..., None]
        pick = torch.argmax(reached.to(torch.uint8), dim=-1, keepdim=True)
        return win.gather(-1, pick).squeeze(-1)
