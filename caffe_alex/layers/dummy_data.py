"""DummyData: tops of a declared shape filled by a filler, produced on the layer's device."""

from __future__ import annotations

import torch

from ..errors import LayerConfigError
from ..fillers import fill
from ..registry import CaffeLayer, register

_LEGACY = ("num", "channels", "height", "width")


def _per_top(values, n_top: int, what: str) -> list:
    if len(values) not in (1, n_top):
        raise LayerConfigError(
            f"dummy_data_param.{what} must be given once, or once per top ({n_top}); "
            f"got {len(values)}"
        )
    return list(values) * n_top if len(values) == 1 else list(values)


def _shapes(p, n_top: int) -> list[tuple[int, ...]]:
    if any(len(getattr(p, f)) for f in _LEGACY):
        if len(p.shape):
            raise LayerConfigError("dummy_data_param has both shape and legacy num/channels/...")
        dims = [_per_top(getattr(p, f), n_top, f) for f in _LEGACY]
        shapes = [tuple(d) for d in zip(*dims, strict=True)]
    else:
        shapes = [tuple(s.dim) for s in _per_top(p.shape, n_top, "shape")]
    for shape in shapes:
        if any(d < 0 for d in shape):
            raise LayerConfigError(f"dummy_data_param shape {list(shape)} has a negative dim")
    return [tuple(int(d) for d in s) for s in shapes]


@register("DummyData")
class DummyDataLayer(CaffeLayer):
    """``dummy_data_param``: shape (one for all tops or one per top) or the legacy
    num/channels/height/width (each once or once per top); data_filler (none = constant 0, one
    for all tops, or one per top).

    Not a source: ``forward()`` makes the tops on the device and dtype of the layer (a zero-size
    buffer follows ``.to()``/``.double()``). As in Caffe, a non-constant filler draws new values
    on every forward; a constant one gives the same values every time.
    """

    bottoms = (0, 0)
    tops = (1, None)
    params = {"dummy_data_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.dummy_data_param
        n_top = len(layer_param.top)
        if len(p.data_filler) not in (0, 1, n_top):
            raise LayerConfigError(
                f"dummy_data_param.data_filler must be given 0, 1 or {n_top} (one per top) "
                f"times; got {len(p.data_filler)}"
            )
        fillers = list(p.data_filler) or [None]
        self.fillers = fillers * n_top if len(fillers) == 1 else fillers
        for filler in self.fillers:
            fill((0,), filler)  # validates the filler type and its options now
        self.shapes = _shapes(p, n_top)
        self.register_buffer("_anchor", torch.zeros(0), persistent=False)

    def top_shapes(self, bottom_shapes):
        return list(self.shapes)

    def forward(self):
        return tuple(self._make(s, f) for s, f in zip(self.shapes, self.fillers, strict=True))

    def _make(self, shape, filler) -> torch.Tensor:
        like = {"device": self._anchor.device, "dtype": self._anchor.dtype}
        kind = filler.type if filler is not None else "constant"
        if kind == "constant":
            return torch.full(shape, filler.value if filler is not None else 0.0, **like)
        if kind == "uniform":
            return torch.empty(shape, **like).uniform_(filler.min, filler.max)
        if kind == "gaussian" and filler.sparse < 0:
            return torch.empty(shape, **like).normal_(filler.mean, filler.std)
        # Rarer fillers (xavier, msra, sparse gaussian, ...) are drawn on the host.
        return fill(shape, filler).to(**like)
