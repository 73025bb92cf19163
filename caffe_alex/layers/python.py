"""Python: a layer whose code is a Python class, as pycaffe runs it.

``python_param { module: "pyloss" layer: "EuclideanLossLayer" param_str: "..." }`` imports
``module`` from ``sys.path`` (as Caffe does: set PYTHONPATH; nothing is ever loaded from a
weights file) and builds ``layer`` with the LayerParameter. The class subclasses ``caffe.Layer``
(``Layer`` here) and defines ``setup(bottom, top)``, ``reshape(bottom, top)``,
``forward(bottom, top)`` and ``backward(top, propagate_down, bottom)`` over pycaffe Blobs
(numpy ``data``/``diff``); it has ``self.param_str`` (also as ``self.param_str_``, the name
caffe-fast-rcnn's pycaffe and so py-faster-rcnn's layers use), ``self.phase`` (0 for TRAIN,
1 for TEST, whose ``str()`` is "TRAIN" or "TEST" as that fork's phase enum gives), ``self.type`` and
``self.blobs`` (``add_blob``: learnable blobs, which this layer registers as its parameters so
solvers update them and .caffemodel files keep them).

As in Caffe: setup then reshape when the net is built (bottoms hold zeros then); reshape before
every forward; the gradient of a learnable blob is what backward writes into its ``diff``.
"""

from __future__ import annotations

import importlib

import torch

from ..blob import Blob, BlobVec
from ..errors import CaffeAlexError, LayerConfigError, describe, raised_in_user_code
from ..registry import CaffeLayer, register


class Phase(int):
    """A layer's phase: the int BVLC's pycaffe gives (0 TRAIN, 1 TEST) whose text is the
    name, as caffe-fast-rcnn's enum prints it (py-faster-rcnn reads ``str(self.phase)``)."""

    def __new__(cls, value: int):
        return super().__new__(cls, value)

    def __str__(self) -> str:
        return "TRAIN" if self == 0 else "TEST"

    __repr__ = __str__


class Layer:
    """The base class of Python layers (pycaffe's ``caffe.Layer``)."""

    type = "Python"

    def __init__(self, param=None):
        self.param_str = param.python_param.param_str if param is not None else ""
        self.phase = Phase(0)
        self.blobs = BlobVec()

    @property
    def param_str_(self) -> str:
        # caffe-fast-rcnn's pycaffe name for param_str (py-faster-rcnn's layers read it)
        return self.param_str

    @param_str_.setter
    def param_str_(self, value: str) -> None:
        self.param_str = value

    def setup(self, bottom, top) -> None:
        pass

    def reshape(self, bottom, top) -> None:
        pass

    def forward(self, bottom, top) -> None:
        raise NotImplementedError("a Python layer must define forward(bottom, top)")

    def backward(self, top, propagate_down, bottom) -> None:
        pass


def _import_class(module: str, name: str):
    if not module or not name:
        raise LayerConfigError("python_param needs both module and layer")
    try:
        loaded = importlib.import_module(module)
    except Exception as exc:  # ImportError, or whatever the module raises while loading
        raise LayerConfigError(
            f"cannot import python_param.module '{module}': {type(exc).__name__}: {describe(exc)} "
            "(Python layers are imported from sys.path: set PYTHONPATH)"
        ) from exc
    cls = getattr(loaded, name, None)
    if not isinstance(cls, type):
        raise LayerConfigError(f"module '{module}' has no class '{name}' (python_param.layer)")
    return cls


def _blobs(tensors) -> list[Blob]:
    return [Blob(t.detach().to("cpu", torch.float32, copy=True)) for t in tensors]


class _PythonFunction(torch.autograd.Function):
    """The user's forward and backward inside autograd. Learnable blobs are passed in only so
    that autograd calls backward when they need a gradient; the user writes their diffs."""

    @staticmethod
    def forward(ctx, host, n_bottom: int, *tensors):
        bottom = _blobs(tensors[:n_bottom])
        top = host.fresh_tops()
        host.call("reshape", bottom, top)
        host.call("forward", bottom, top)
        host.top_dims = [t.shape for t in top]
        ctx.host, ctx.bottom, ctx.top = host, bottom, top
        device = tensors[0].device if tensors else host.device()
        return tuple(t.data_tensor().to(device, copy=True) for t in top)

    @staticmethod
    def backward(ctx, *grads):
        host, bottom, top = ctx.host, ctx.bottom, ctx.top
        n_bottom = len(bottom)
        for blob, grad in zip(top, grads):
            if grad is not None:
                blob.set_diff(grad.detach().to("cpu", torch.float32))
        propagate_down = [bool(ctx.needs_input_grad[2 + i]) for i in range(n_bottom)]
        for blob in bottom:
            blob.set_diff(torch.zeros(blob.shape))
        host.call("backward", top, propagate_down, bottom)
        out = [
            b.diff_tensor().to(g_device) if need else None
            for b, need, g_device in zip(bottom, propagate_down, host.bottom_devices)
        ]
        return (None, None, *out, *([None] * (len(ctx.needs_input_grad) - 2 - n_bottom)))


@register("Python")
class PythonLayer(CaffeLayer):
    bottoms = (0, None)
    tops = (0, None)
    params = {"python_param": None}

    def __init__(self, layer_param, bottom_shapes, phase):
        super().__init__(layer_param, bottom_shapes, phase)
        p = layer_param.python_param
        self.where = f"{p.module}.{p.layer}"
        cls = _import_class(p.module, p.layer)
        self.n_top = len(layer_param.top)
        # Caffe's top blobs outlive each call: a reshape that does nothing (py-faster-rcnn's
        # layers reshape in forward) leaves them as they were. Here each call gets new blobs of
        # the shapes the last call left.
        self.top_dims: list[tuple[int, ...]] = [(0,)] * self.n_top
        self.bottom_devices = [torch.device("cpu")] * len(bottom_shapes)
        self.impl = self._construct(cls, layer_param, phase)
        self._built_for = [tuple(s) for s in bottom_shapes]
        self._shapes = self._shapes_for(bottom_shapes, "setup")

    def _construct(self, cls, layer_param, phase):
        try:
            impl = cls(layer_param)
        except Exception as exc:
            raised_in_user_code(exc, f"{self.where}.__init__", layer=self.name,
                                layer_type="Python")  # fmt: skip
            raise
        # Caffe sets these on the object whatever its __init__ did
        impl.param_str = layer_param.python_param.param_str
        impl.phase = Phase(0 if phase == "TRAIN" else 1)
        impl.blobs = BlobVec(on_add=self._add_learnable)
        return impl

    def _add_learnable(self, tensor: torch.Tensor):
        index = len(self.blobs)
        self.add_blob(tensor)
        return lambda: self.blobs[index]

    def _shapes_for(self, bottom_shapes, first: str):
        bottom = [Blob(torch.zeros(tuple(s))) for s in bottom_shapes]
        top = self.fresh_tops()
        try:
            if first == "setup":
                self.call("setup", bottom, top)
            self.call("reshape", bottom, top)
        except CaffeAlexError as exc:
            raise LayerConfigError(exc.message) from exc.__cause__
        self.top_dims = [t.shape for t in top]
        return list(self.top_dims)

    def fresh_tops(self) -> list[Blob]:
        return [Blob(torch.zeros(shape)) for shape in self.top_dims]

    def top_shapes(self, bottom_shapes):
        if [tuple(s) for s in bottom_shapes] == self._built_for:
            return list(self._shapes)
        return self._shapes_for(bottom_shapes, "reshape")

    def call(self, method: str, *args) -> None:
        """Run one of the user's methods. What it raises goes on to the caller as it is (as
        pycaffe lets a Python layer's exception through), with a note naming the layer, module,
        class and method, and the one line the command line prints for it."""
        try:
            getattr(self.impl, method)(*args)
        except CaffeAlexError:
            raise
        except Exception as exc:
            raised_in_user_code(exc, f"{self.where}.{method}", layer=self.name,
                                layer_type="Python")  # fmt: skip
            raise
        for blob in self.impl.blobs:  # the user may have written values or diffs
            blob.sync()

    # -- Caffe's own calls, over the net's blobs (layerwise.py: pycaffe's Net) -------------
    def blob_forward(self, bottom: list[Blob], top: list[Blob]) -> tuple:
        """Reshape, then forward, on the net's own blobs (a Python layer's bottom and top are
        Caffe's blobs); returns the tops' values."""
        self.call("reshape", bottom, top)
        self.call("forward", bottom, top)
        self.top_dims = [t.shape for t in top]
        return tuple(t.data_tensor() for t in top)

    def blob_backward(self, top: list[Blob], propagate_down: list[bool], bottom: list[Blob]):
        """The user's backward on the net's own blobs: it reads the tops' diffs (and whatever
        data it needs) as they are now and writes the bottoms' diffs."""
        self.call("backward", top, propagate_down, bottom)

    def device(self) -> torch.device:
        return self.blobs[0].device if len(self.blobs) else torch.device("cpu")

    def forward(self, *bottoms):
        self.bottom_devices = [b.device for b in bottoms]
        learnable = list(self.blobs)
        out = _PythonFunction.apply(self, len(bottoms), *bottoms, *learnable)
        return out if len(out) != 1 else out[0]
