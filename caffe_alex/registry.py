"""The layer registry: Caffe type string -> layer class, and the base class every layer extends.

A layer module ends its class with ``@register("TypeName")`` the way Caffe's layer files end
with ``REGISTER_LAYER_CLASS``. Adding a layer is a one-file change: write the module under
``caffe_alex/layers/`` (its package imports every module in it, so the decorators run). This
module never imports the layers: ``caffe_alex.layers.layer_types()`` lists the whole catalogue.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from .errors import LayerConfigError
from .fillers import check_blob_shape, fill

Shape = tuple[int, ...]

_LAYER_TYPES: dict[str, type[CaffeLayer]] = {}


def register(*type_names: str):
    """Class decorator registering a layer under one or more exact Caffe type strings."""

    def decorate(cls: type[CaffeLayer]) -> type[CaffeLayer]:
        for name in type_names:
            if name in _LAYER_TYPES:
                raise ValueError(
                    f"layer type '{name}' registered twice "
                    f"({_LAYER_TYPES[name].__qualname__} and {cls.__qualname__})"
                )
            _LAYER_TYPES[name] = cls
        if not getattr(cls, "type_names", None):
            cls.type_names = tuple(type_names)
        return cls

    return decorate


def registered_types() -> list[str]:
    """The Caffe type strings registered so far, sorted (import ``caffe_alex.layers`` first for
    the built-in ones, or call ``caffe_alex.layers.layer_types()``)."""
    return sorted(_LAYER_TYPES)


def get_layer_class(type_name: str) -> type[CaffeLayer]:
    try:
        return _LAYER_TYPES[type_name]
    except KeyError:
        raise LayerConfigError(
            f"unknown layer type '{type_name}': neither BVLC Caffe's nor a fork's that caffe-alex "
            "implements (docs/forks.md); add it in a few lines with caffe_alex.register "
            f"(docs/forks.md, 'Your own fork'); known types: {', '.join(sorted(_LAYER_TYPES))}"
        ) from None


class CaffeLayer(nn.Module):
    """Base class of every Caffe layer.

    Subclasses declare:
      ``bottoms`` / ``tops``: (min, max) counts accepted (max None = unbounded);
      ``params``: the ``*_param`` messages honoured, each mapped to the set of its fields the
      layer implements (None = all). A set field outside that set is rejected by the builder;
      ``is_loss``: top 0 gets loss_weight 1 unless the prototxt says otherwise;
      ``is_source``: the layer's tops are net inputs fed from outside (Input and data layers);
      ``pure``: the layer does nothing but compute its tops (no random draw, no state, no
      I/O), so a pass that needs only the loss may skip it where no loss needs its tops.

    ``__init__(layer_param, bottom_shapes, phase)`` creates the learnable blobs in Caffe's order
    and layout in ``self.blobs`` (an ``nn.ParameterList``) with ``new_blob(shape, filler)``,
    which refuses a shape Caffe's blobs cannot have before filling; ``top_shapes(bottom_shapes)``
    is the shape inference (Caffe's Reshape; the builder checks the shapes it returns);
    ``forward(*bottoms)`` returns a tensor or a tuple of them.
    Configuration problems raise ``LayerConfigError``; the builder adds file, line and layer name.
    """

    type_names: tuple[str, ...] = ()
    bottoms: tuple[int, int | None] = (1, 1)
    tops: tuple[int, int | None] = (1, 1)
    params: dict[str, frozenset[str] | None] = {}
    is_loss: bool = False
    is_source: bool = False
    pure: bool = False
    # Caffe runs a layer whose top is named like its bottom in place, saving memory. Here that
    # is safe only where autograd keeps nothing that the overwrite would spoil:
    # ``can_overwrite_bottom``: forward may write its result into bottom 0 when ``in_place`` is
    # set (the builder decides); ``output_needed_by_backward``: False where this layer's backward
    # never reads its own top, so a following layer may overwrite that top.
    can_overwrite_bottom: bool = False
    output_needed_by_backward: bool = True
    in_place: bool = False

    def __init__(self, layer_param, bottom_shapes: Sequence[Shape], phase: str):
        super().__init__()
        self.name = layer_param.name
        self.type_name = layer_param.type
        self.phase = phase
        self.blobs = BlobList()

    # nn.Module finds a submodule through __getattr__, after a failed lookup: a forward that
    # reads self.blobs[0] paid ~5 microseconds for it, as much as a small layer's math.
    @property
    def blobs(self) -> BlobList:
        return self._modules["blobs"]

    def may_overwrite(self, x: torch.Tensor, *operands: torch.Tensor) -> bool:
        """Whether forward may compute into its bottom ``x`` (``x.op_(operand)``): declared in
        place (the builder checked that nothing else reads the old values), no gradient being
        recorded through ``x`` (inference), and the result keeping x's dtype (under autocast a
        float32 operand would widen it)."""
        if not self.in_place or (x.requires_grad and torch.is_grad_enabled()):
            return False
        return all(torch.result_type(x, o) == x.dtype for o in operands)

    def top_shapes(self, bottom_shapes: Sequence[Shape]) -> list[Shape]:
        """Default: one top with the bottom's shape (element-wise layers)."""
        return [tuple(bottom_shapes[0])]

    def allow_force_backward(self, bottom: int) -> bool:
        """Caffe's AllowForceBackward: whether force_backward gives bottom ``bottom`` a diff;
        a loss layer's bottom 1 (its labels) gets none."""
        return not (self.is_loss and bottom == 1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, type={self.type_name!r}"

    # -- weights files of other forks -----------------------------------------------------
    def accepts_blob_shape(self, index: int, shape: tuple[int, ...]) -> bool:
        """Whether a weights file's blob ``index`` of ``shape`` (not this layer's own shape)
        holds the same values in another fork's layout; it is then copied by count."""
        return False

    def blob_count_note(self) -> str:
        """A hint added to the error when a weights file has another number of blobs."""
        return ""

    # -- helpers for subclasses ---------------------------------------------------------
    def new_blob(
        self, shape: Sequence[int], filler=None, *, requires_grad: bool = True
    ) -> nn.Parameter:
        """The next learnable blob, of ``shape``, filled as ``filler`` (None: zeros). A shape
        past Caffe's limits is refused, naming the blob's index, before anything is allocated."""
        what = f"learnable blob {len(self.blobs)}"
        return self.add_blob(fill(shape, filler, what=what), requires_grad=requires_grad)

    def add_blob(self, tensor: torch.Tensor, requires_grad: bool = True) -> nn.Parameter:
        """Register an existing tensor as the next learnable blob (held to the same limits)."""
        check_blob_shape(tensor.shape, f"learnable blob {len(self.blobs)}")
        param = nn.Parameter(tensor, requires_grad=requires_grad)
        self.blobs.append(param)
        return param


class BlobList(nn.ParameterList):
    """A layer's learnable blobs: nn.ParameterList, read by index without its generic path."""

    def __getitem__(self, idx):
        if type(idx) is int and idx >= 0:
            blob = self._parameters.get(str(idx))
            if blob is not None:
                return blob
        return super().__getitem__(idx)


def canonical_axis(axis: int, num_axes: int, what: str = "axis") -> int:
    """Caffe's Blob::CanonicalAxisIndex: negative counts from the end; out of range is an error."""
    if not -num_axes <= axis < num_axes:
        raise LayerConfigError(f"{what} {axis} out of range for a {num_axes}-D blob")
    return axis + num_axes if axis < 0 else axis


def count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    result = 1
    for d in shape[start:end]:
        result *= d
    return result


_is_compiling = getattr(torch.compiler, "is_compiling", None) or (lambda: False)


def compiling() -> bool:
    """Whether torch.compile is tracing (torch.export too: it traces with dynamo), or the
    captured step is traced for it (``step_tracing``). False on torch versions without
    ``torch.compiler.is_compiling`` (before 2.3)."""
    return _step_tracing or _is_compiling()


_step_tracing = False


@contextlib.contextmanager
def step_tracing():
    """A training step traced by ``make_fx`` for inductor to compile (solvers/looped.py): the
    layers take their compiled forms, as under torch.compile."""
    global _step_tracing
    before, _step_tracing = _step_tracing, True
    try:
        yield
    finally:
        _step_tracing = before


def exporting() -> bool:
    """Whether torch.export is tracing (layers then avoid what it cannot trace). False on torch
    versions without ``torch.compiler.is_exporting`` (before 2.3), which have no such export."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return bool(is_exporting and is_exporting())


def tracing() -> bool:
    """Whether torch.compile or torch.export is tracing: what reads values on the host (range
    checks, Python-side fast paths) or changes the thread count is left out then."""
    return compiling() or exporting()
