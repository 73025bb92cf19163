"""The segmentation forks' resampling layers.

``Interp`` (DeepLab v2, hszhao/PSPNet): bilinear resampling on corner-aligned grids, honouring
``interp_param`` height, width, zoom_factor, shrink_factor, pad_beg, pad_end, or the size of a
second bottom (the DeepLab v2 form that takes it).

``Upsample``: caffe-segnet's max-unpooling when a second bottom (the mask top of a MAX Pooling
layer) is given, honouring ``upsample_param`` scale, scale_h, scale_w, pad_out_h, pad_out_w,
upsample_h, upsample_w; with one bottom, the YOLOv3 ports' nearest-neighbour upsampling by
``scale`` (their default 1).
"""

from __future__ import annotations

import struct

import torch

from ..errors import CaffeAlexError, LayerConfigError
from ..registry import CaffeLayer, register, tracing
from .indexing import first_bad


def legacy_shape(shape, what: str = "bottom") -> tuple[int, int, int, int]:
    """Caffe's num/channels/height/width view of a blob of at most 4 axes (missing ones are 1)."""
    shape = tuple(shape)
    if len(shape) > 4:
        raise LayerConfigError(f"{what} has {len(shape)} axes {list(shape)}: at most 4 allowed")
    return (*shape, 1, 1, 1, 1)[:4]


def _float32(value: float) -> float:
    # Round a double to the nearest float32 (the fork computes its ratios in float). A quotient
    # of two ints rounded to double first and then to float32 equals the float32 quotient.
    return struct.unpack("f", struct.pack("f", value))[0]


def _interp_axis(size_in: int, size_out: int, device, dtype):
    """For each output row (or column): the two source rows and their weights, computed as the
    fork does in float32 (``ratio * i``, truncated) whatever the data type."""
    ratio = _float32((size_in - 1) / (size_out - 1)) if size_out > 1 else 0.0
    pos = torch.arange(size_out, device=device, dtype=torch.float32) * ratio
    low = pos.to(torch.int64)
    high = low + (low < size_in - 1).to(torch.int64)  # the last row pairs with itself
    w_high = (pos - low.to(torch.float32)).to(dtype)
    return low, high, 1 - w_high, w_high


@register("Interp")
class InterpLayer(CaffeLayer):
    """Bilinear resampling with the corners of input and output aligned (ratio (H1-1)/(H2-1)).

    Output size, in the fork's order: shrink_factor alone: (H - 1) / shrink + 1; zoom_factor
    alone: H + (H - 1) * (zoom - 1); height and width; both factors: shrink, then zoom; else
    the second bottom's height and width. H is the input cropped by pad_beg and pad_end
    (both <= 0); the crop starts at -pad_beg on both axes, as the fork's does.
    """

    bottoms = (1, 2)
    params = {"interp_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.interp_param
        self.pad_beg, self.pad_end = param.pad_beg, param.pad_end
        for name, value in (("pad_beg", self.pad_beg), ("pad_end", self.pad_end)):
            if value > 0:
                raise LayerConfigError(
                    f"interp_param.{name} is {value}: only values <= 0 (cropping) are supported"
                )
        # The fork's branch order, decided once (forward then reads plain ints).
        has = param.HasField
        self.shrink = self.zoom = self.size = None
        if has("shrink_factor") and not has("zoom_factor"):
            self.shrink = self._factor(param, "shrink_factor")
        elif has("zoom_factor") and not has("shrink_factor"):
            self.zoom = self._factor(param, "zoom_factor")
        elif has("height") and has("width"):
            self.size = (param.height, param.width)
        elif has("shrink_factor") and has("zoom_factor"):
            self.shrink = self._factor(param, "shrink_factor")
            self.zoom = self._factor(param, "zoom_factor")
        elif len(bottom_shapes) != 2:
            raise LayerConfigError(
                "no output size: interp_param sets neither height and width, zoom_factor nor "
                "shrink_factor, and there is no second bottom to take the size from"
            )

    @staticmethod
    def _factor(param, name: str) -> int:
        value = getattr(param, name)
        if value < 1:
            raise LayerConfigError(f"interp_param.{name} must be >= 1, got {value}")
        return value

    def _sizes(self, bottom_shapes):
        """(cropped input size, output size), each (height, width), as the fork's Reshape."""
        _, _, height, width = legacy_shape(bottom_shapes[0])
        crop = self.pad_beg + self.pad_end
        size_in = (height + crop, width + crop)
        if min(size_in) <= 0:
            raise LayerConfigError(
                f"the bottom's {height}x{width} cropped by pad_beg {self.pad_beg} and pad_end "
                f"{self.pad_end} leaves {size_in[0]}x{size_in[1]}: must be positive"
            )
        if self.size is not None:
            size_out = self.size
        elif self.shrink is None and self.zoom is None:
            size_out = legacy_shape(bottom_shapes[1], "bottom 1")[2:]
        else:
            size_out = size_in
            if self.shrink is not None:
                size_out = tuple((n - 1) // self.shrink + 1 for n in size_out)
            if self.zoom is not None:
                size_out = tuple(n + (n - 1) * (self.zoom - 1) for n in size_out)
        if min(size_out) <= 0:
            raise LayerConfigError(f"output size {size_out[0]}x{size_out[1]} must be positive")
        return size_in, size_out

    def top_shapes(self, bottom_shapes):
        _, size_out = self._sizes(bottom_shapes)
        num, channels = legacy_shape(bottom_shapes[0])[:2]
        return [(num, channels, *size_out)]

    def forward(self, x, *size_bottom):
        shapes = [tuple(x.shape)] + [tuple(b.shape) for b in size_bottom]
        (h_in, w_in), (h_out, w_out) = self._sizes(shapes)
        x = x.reshape(legacy_shape(x.shape))
        start = -self.pad_beg
        x = x[:, :, start : start + h_in, start : start + w_in]
        if (h_in, w_in) == (h_out, w_out):
            return x.clone()  # the fork copies the cropped input
        top, bottom, w_top, w_bottom = _interp_axis(h_in, h_out, x.device, x.dtype)
        left, right, w_left, w_right = _interp_axis(w_in, w_out, x.device, x.dtype)
        w_top, w_bottom = w_top[:, None], w_bottom[:, None]
        rows0, rows1 = x.index_select(2, top), x.index_select(2, bottom)
        # The fork's order of operations; index_select's backward is the scatter-add that the
        # fork's interp2_backward performs.
        upper = w_left * rows0.index_select(3, left) + w_right * rows0.index_select(3, right)
        lower = w_left * rows1.index_select(3, left) + w_right * rows1.index_select(3, right)
        return w_top * upper + w_bottom * lower


class _MaxUnpool(torch.autograd.Function):
    """caffe-segnet's unpooling: top[mask[i]] = x[i] (the last i wins where two share a
    target, as the fork's CPU loop), zeros elsewhere. Backward gathers: dx[i] = dtop[mask[i]]
    for every i, also where another i won the target, as the fork does, so it is not the
    adjoint of this forward when the mask repeats an index."""

    @staticmethod
    def forward(ctx, x, index, valid, size: int):
        flat = x.reshape(*x.shape[:2], -1)
        positions = torch.arange(flat.shape[2], device=x.device).expand_as(index)
        owner = torch.full((*x.shape[:2], size), -1, dtype=torch.int64, device=x.device)
        owner.scatter_reduce_(2, index, torch.where(valid, positions, -1), "amax")
        gathered = flat.gather(2, owner.clamp(min=0))
        ctx.save_for_backward(index, valid)
        ctx.shape = x.shape
        return torch.where(owner >= 0, gathered, x.new_zeros(()))

    @staticmethod
    def backward(ctx, dtop):
        index, valid = ctx.saved_tensors
        grad = torch.where(valid, dtop.gather(2, index), dtop.new_zeros(()))
        return grad.reshape(ctx.shape), None, None, None


@register("Upsample")
class UpsampleLayer(CaffeLayer):
    """Two bottoms: caffe-segnet's max-unpooling of bottom 0 by the mask of bottom 1 (flat
    indices h * W + w per channel, as a MAX Pooling layer's second top gives them). One bottom:
    each pixel repeated ``scale`` x ``scale`` times (YOLOv3 ports)."""

    bottoms = (1, 2)
    params = {"upsample_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.upsample_param
        self.unpool = len(bottom_shapes) == 2
        if self.unpool:
            self._setup_unpool(param)
            return
        others = [f.name for f, _ in param.ListFields() if f.name != "scale"]
        if others:
            raise LayerConfigError(
                f"upsample_param.{others[0]} needs a pooling mask as second bottom (caffe-segnet's "
                "max-unpooling); with one bottom (YOLOv3 ports' nearest) only scale applies"
            )
        self.scale = param.scale if param.HasField("scale") else 1  # the YOLOv3 ports' default
        if self.scale < 1:
            raise LayerConfigError(f"upsample_param.scale must be >= 1, got {self.scale}")

    def _setup_unpool(self, param) -> None:
        has = param.HasField
        if not (
            (has("upsample_h") and has("upsample_w"))
            or (not has("scale") and has("scale_h") and has("scale_w"))
            or (not has("scale_h") and not has("scale_w"))
        ):
            raise LayerConfigError(
                "give upsample_h and upsample_w, or scale, or scale_h and scale_w "
                "(not scale together with scale_h or scale_w)"
            )
        self.size = None
        if has("upsample_h") and has("upsample_w"):
            self.size = (param.upsample_h, param.upsample_w)
            for name, value in zip(("upsample_h", "upsample_w"), self.size):
                if value <= 1:
                    raise LayerConfigError(f"upsample_param.{name} must be > 1, got {value}")
            return
        if has("scale_h"):
            self.scales = (param.scale_h, param.scale_w)
            names = ("scale_h", "scale_w")
        else:
            self.scales, names = (param.scale, param.scale), ("scale", "scale")
        for name, value in zip(names, self.scales):
            if value <= 1:
                raise LayerConfigError(f"upsample_param.{name} must be > 1, got {value}")
        self.pad_out = (int(param.pad_out_h), int(param.pad_out_w))
        for axis, pad, scale in zip("hw", self.pad_out, self.scales):
            if pad and scale != 2:
                raise LayerConfigError(
                    f"upsample_param.pad_out_{axis} needs a scale of 2 on that axis, got {scale}"
                )

    def _unpool_size(self, shape) -> tuple[int, int]:
        if self.size is not None:
            return self.size
        return tuple(n * s - p for n, s, p in zip(shape[2:], self.scales, self.pad_out))

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise LayerConfigError(f"needs a 4-D (N, C, H, W) bottom, got shape {list(shape)}")
        if not self.unpool:
            return [(*shape[:2], shape[2] * self.scale, shape[3] * self.scale)]
        mask = tuple(bottom_shapes[1])
        if mask != shape:
            raise LayerConfigError(
                f"the mask (bottom 1) has shape {list(mask)}, but bottom 0 has {list(shape)}: "
                "they must be equal (the mask comes from the MAX Pooling layer being undone)"
            )
        return [(*shape[:2], *self._unpool_size(shape))]

    def forward(self, x, mask=None):
        if not self.unpool:
            n, c, h, w = x.shape
            s = self.scale
            return x[:, :, :, None, :, None].expand(n, c, h, s, w, s).reshape(n, c, h * s, w * s)
        height, width = self._unpool_size(x.shape)
        size = height * width
        whole = mask.reshape(*mask.shape[:2], -1).detach().trunc()  # the fork's int cast
        valid = (whole >= 0) & (whole < size)  # NaN fails both
        if not tracing():
            bad = first_bad(~valid, mask)
            if bad is not None:
                raise CaffeAlexError(
                    f"mask value {bad[1]:g} (element {bad[0]} of bottom 1) is not an index into "
                    f"the {height}x{width} top: check that upsample_param matches the MAX "
                    "Pooling layer that made the mask",
                    layer=self.name,
                    layer_type=self.type_name,
                )
        index = torch.where(valid, whole, 0).to(torch.int64)
        top = _MaxUnpool.apply(x, index, valid, size)
        return top.reshape(*x.shape[:2], height, width)
