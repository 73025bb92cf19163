"""Input: the net's declared inputs (input_param.shape), fed from outside."""

from __future__ import annotations

from ..errors import LayerConfigError
from ..registry import CaffeLayer, register


@register("Input")
class InputLayer(CaffeLayer):
    """Tops are net inputs. ``input_param.shape``: one shape for all tops, or one per top."""

    bottoms = (0, 0)
    tops = (1, None)
    params = {"input_param": frozenset({"shape"})}
    is_source = True

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        shapes = [tuple(int(d) for d in s.dim) for s in layer_param.input_param.shape]
        n_top = len(layer_param.top)
        if len(shapes) not in (0, 1, n_top):
            raise LayerConfigError(
                f"input_param has {len(shapes)} shapes for {n_top} tops; give one, or one per top"
            )
        self.shapes = shapes * n_top if len(shapes) == 1 else shapes
        self.n_top = n_top

    def top_shapes(self, bottom_shapes):
        if not self.shapes:
            raise LayerConfigError("input_param.shape is required (no shape given for the tops)")
        return list(self.shapes)

    def forward(self):  # never called: the net binds inputs directly
        raise RuntimeError("Input layers are fed by the net")
