"""Layers that change a blob's shape or cut a window of it: Flatten, Reshape, Crop.

Flatten honours ``flatten_param``: ``axis``, ``end_axis``; Reshape ``reshape_param``:
``shape``, ``axis``, ``num_axes``; Crop ``crop_param``: ``axis``, ``offset``.
"""

from __future__ import annotations

from ..errors import LayerConfigError
from ..registry import CaffeLayer, canonical_axis, count, register
from .blob_ops import reject_in_place


@register("Flatten")
class FlattenLayer(CaffeLayer):
    """Merges axes ``axis`` .. ``end_axis`` (inclusive; default 1 .. -1) into one."""

    params = {"flatten_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        reject_in_place(layer_param)
        self.param = layer_param.flatten_param

    def top_shapes(self, bottom_shapes):
        shape = tuple(bottom_shapes[0])
        start = canonical_axis(self.param.axis, len(shape))
        end = canonical_axis(self.param.end_axis, len(shape), "end_axis")
        if end + 1 < start:
            raise LayerConfigError(f"flatten_param.end_axis {end} is before axis {start}")
        return [shape[:start] + (count(shape, start, end + 1),) + shape[end + 1 :]]

    def forward(self, x):
        return x.reshape(self.top_shapes([x.shape])[0])


@register("Reshape")
class ReshapeLayer(CaffeLayer):
    """Replaces bottom axes ``axis`` .. ``axis + num_axes`` by ``shape``.

    In ``shape`` a 0 copies the bottom's dim at that place and one -1 is inferred. A negative
    ``axis`` counts as ``num_axes + axis + 1`` (Caffe's rule), so -1 appends after the last axis.
    """

    params = {"reshape_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        reject_in_place(layer_param)
        param = layer_param.reshape_param
        self.dims = [int(d) for d in param.shape.dim]
        if self.dims.count(-1) > 1:
            raise LayerConfigError(f"reshape_param.shape {self.dims} has more than one -1")
        self.axis, self.num_axes = param.axis, param.num_axes

    def top_shapes(self, bottom_shapes):
        shape = [int(d) for d in bottom_shapes[0]]
        start, end = self._span(len(shape))
        top = shape[:start] + list(self.dims) + shape[end:]
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= len(shape):
                    raise LayerConfigError(
                        f"reshape_param.shape {self.dims} has a 0 at position {i}, but bottom "
                        f"{shape} has no axis {start + i} to copy"
                    )
                top[start + i] = shape[start + i]
        if -1 in self.dims:
            known = count([d for d in top if d != -1])
            if known == 0 or count(shape) % known:
                raise LayerConfigError(
                    f"bottom count {count(shape)} (shape {shape}) is not divisible by the "
                    f"product {known} of the given dims of {top}"
                )
            top[top.index(-1)] = count(shape) // known
        if count(top) != count(shape):
            raise LayerConfigError(
                f"output count must match input count: reshape_param.shape {self.dims} gives "
                f"{top} ({count(top)} values) from bottom {shape} ({count(shape)} values)"
            )
        return [tuple(top)]

    def _span(self, ndim: int) -> tuple[int, int]:
        start = self.axis if self.axis >= 0 else ndim + self.axis + 1
        if not 0 <= start <= ndim:
            raise LayerConfigError(
                f"reshape_param.axis {self.axis} out of range for {ndim}-D bottom"
            )
        if self.num_axes < -1:
            raise LayerConfigError(f"reshape_param.num_axes must be >= -1, got {self.num_axes}")
        end = ndim if self.num_axes == -1 else start + self.num_axes
        if end > ndim:
            raise LayerConfigError(
                f"reshape_param.axis {self.axis} + num_axes {self.num_axes} is out of range for "
                f"{ndim}-D bottom"
            )
        return start, end

    def forward(self, x):
        return x.reshape(self.top_shapes([x.shape])[0])


@register("Crop")
class CropLayer(CaffeLayer):
    """Crops bottom 0 to bottom 1's size on every axis from ``axis`` (default 2) on.

    ``offset``: none (0), one for every cropped axis, or one per cropped axis. The reference
    bottom only lends its shape: it gets no gradient.
    """

    bottoms = (2, 2)
    params = {"crop_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        param = layer_param.crop_param
        self.axis = param.axis
        self.offsets = [int(o) for o in param.offset]
        ndim = len(bottom_shapes[0])
        start = canonical_axis(self.axis, ndim)
        if len(self.offsets) > 1 and start + len(self.offsets) != ndim:
            raise LayerConfigError(
                f"crop_param has {len(self.offsets)} offsets, but axes {start}..{ndim - 1} of the "
                f"{ndim}-D bottom are cropped: give one offset, or one per cropped axis"
            )

    def _window(self, data, reference) -> list[tuple[int, int]]:
        """(offset, size) per axis of ``data``."""
        start = canonical_axis(self.axis, len(data))
        if len(reference) < len(data):
            raise LayerConfigError(
                f"the reference bottom 1 {list(reference)} has fewer axes than "
                f"bottom 0 {list(data)}"
            )
        window = []
        for i, size in enumerate(data):
            if i < start:
                window.append((0, size))
                continue
            offset = self.offsets[0 if len(self.offsets) == 1 else i - start] if self.offsets else 0
            if offset + reference[i] > size:
                raise LayerConfigError(
                    f"the crop of axis {i} is out of bounds: size {reference[i]} at offset "
                    f"{offset} in bottom 0 {list(data)} (reference {list(reference)})"
                )
            window.append((offset, reference[i]))
        return window

    def top_shapes(self, bottom_shapes):
        return [tuple(size for _, size in self._window(bottom_shapes[0], bottom_shapes[1]))]

    def forward(self, x, reference):
        for dim, (offset, size) in enumerate(self._window(x.shape, reference.shape)):
            if offset or size != x.shape[dim]:
                x = x.narrow(dim, offset, size)
        return x
